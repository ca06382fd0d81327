"""The one exception the ``kvtier`` command turns into a sentence and exit status 2."""

from __future__ import annotations

EXIT_USAGE = 2
MAX_ERROR_CHARS = 2000  # the longest refusal the command writes (what it quotes is cut)


class CLIError(Exception):
    """Bad input the user can fix; ``kvtier.cli.main`` prints it as one line and exits 2."""
