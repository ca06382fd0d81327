"""Run the ``kvtier`` command: ``python -m kvtier``."""

from kvtier.cli import main

raise SystemExit(main())
