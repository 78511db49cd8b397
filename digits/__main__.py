"""`python -m digits ...`, the same as the installed `digits` command."""

from digits.cli import main

main()
