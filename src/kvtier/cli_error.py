"""The one exception the ``kvtier`` command turns into a sentence and exit status 2."""

from __future__ import annotations

EXIT_USAGE = 2


class CLIError(Exception):
    """Bad input the user can fix; ``kvtier.cli.main`` prints it as one line and exits 2."""
