"""`python -m latentd`: the `latentd` command, where the venv's scripts are not on PATH."""

from latentd.cli import main

raise SystemExit(main())
