"""Run the command line with ``python -m hivebus.cli``."""

from hivebus.cli import main

main()
