# Sourced by the launchers (run from the repository root): the Python to run the scripts with.
# $PYTHON if set, else the project's virtual environment ($MEDSEGX_VENV, default .venv, as made by
# setup-env.sh) when it exists, else python3 from PATH (an environment you activated yourself).
if [ -z "${PYTHON:-}" ]; then
    if [ -x "${MEDSEGX_VENV:-.venv}/bin/python" ]; then
        PYTHON=${MEDSEGX_VENV:-.venv}/bin/python
    else
        PYTHON=python3
    fi
fi
