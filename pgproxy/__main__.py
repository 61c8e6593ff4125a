"""`python -m pgproxy` runs the CLI."""

from .cli import main

main()
