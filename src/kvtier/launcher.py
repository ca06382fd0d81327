"""The ``kvtier`` command's entry point: the CLI imported inside the command's Ctrl-C handling.

Importing the CLI takes a few hundred milliseconds (the simulator, the scheduler, argparse);
a Ctrl-C then used to print the import's traceback. Here it ends the command as one during
a run does: ``kvtier: interrupted`` on stderr, exit status 130. ``kvtier``'s package
``__init__`` imports nothing eagerly, so this module is the first thing the command runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def interrupted() -> int:
    """The command's answer to a Ctrl-C, wherever it came (here or in :func:`kvtier.cli.main`):
    one line on stderr; returns the exit status."""
    print("kvtier: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`kvtier.cli.main` on ``argv``, a Ctrl-C at any point (the CLI's import, its
    argument parsing, the run) ending in one line and status 130."""
    try:
        from kvtier.cli import main as run

        return run(argv)
    except KeyboardInterrupt:
        return interrupted()
