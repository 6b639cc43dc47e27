"""`python -m helpers <command>`: the command line of helpers/cli.py as a module.

Usage: `python -m helpers --help`, `python -m helpers run --preset toy`
"""

from helpers.cli import main

raise SystemExit(main())
