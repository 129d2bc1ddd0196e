"""``python -m medsegx <command> ...``: the same as the ``medsegx`` command."""
from medsegx.cli import main

main()
