"""`python -m sla2cli ...` runs the `sla2` command line (useful where the script is not installed)."""

from sla2cli.cli import main

main()
