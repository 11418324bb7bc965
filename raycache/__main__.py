"""``python -m raycache``: the ``raycache`` command (see :mod:`raycache.cli`)."""

from raycache.cli import main

raise SystemExit(main())
