"""python -m m2convert: the command line (see m2convert.cli)."""

from .cli import main

raise SystemExit(main())
