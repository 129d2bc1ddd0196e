# Sourced by the launchers (run from the repository root): the Python to run the scripts with.
# $MEDSEGX_PYTHON if set, else the project's virtual environment ($MEDSEGX_VENV, default .venv, as made by
# setup-env.sh) when it exists, else python3 from PATH (an environment you activated yourself).
# (Not $PYTHON: setup-env.sh reads that as the base interpreter the venv is created from.)
if [ -z "${MEDSEGX_PYTHON:-}" ]; then
    if [ -x "${MEDSEGX_VENV:-.venv}/bin/python" ]; then
        MEDSEGX_PYTHON=${MEDSEGX_VENV:-.venv}/bin/python
    else
        MEDSEGX_PYTHON=python3
    fi
fi
