"""Run the ``kvtier`` command: ``python -m kvtier``."""

from kvtier.launcher import main

raise SystemExit(main())
