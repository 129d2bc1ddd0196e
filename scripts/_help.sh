# Sourced first by every script in scripts/ (after `cd` to the repository root): with -h or --help among
# the script's arguments it prints the script's usage (its header comment) and, for a launcher that sets
# HELP_PYTHON, the usage of the Python script it runs; then it exits 0 without doing any work.
for _arg in "$@"; do
    if [ "$_arg" = "-h" ] || [ "$_arg" = "--help" ]; then
        echo "usage: bash scripts/$(basename "$0") [flags]"
        sed -n '2,/^[^#]/p' "$0" | sed -n 's/^# \{0,1\}//p'
        if [ -n "${HELP_PYTHON:-}" ]; then
            source scripts/_python.sh
            echo
            echo "Flags are passed on to $HELP_PYTHON:"
            "$MEDSEGX_PYTHON" "$HELP_PYTHON" --help
        fi
        exit 0
    fi
done
unset _arg
