"""`python -m helpers <command>`: see helpers/cli.py."""

from helpers.cli import main

raise SystemExit(main())
