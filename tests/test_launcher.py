"""The package's lazy public names and the ``kvtier`` command's launcher (Ctrl-C while the
CLI is still importing ends in one line and status 130, not a traceback)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kvtier
from kvtier.launcher import EXIT_INTERRUPTED


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_import_kvtier_imports_no_submodule() -> None:
    """``import kvtier`` (and the launcher) load none of the package's modules: what the
    command's first instant runs outside its Ctrl-C handling is only this."""
    out = _child("""
        import sys
        import kvtier.launcher
        print(sorted(m for m in sys.modules if m.startswith("kvtier")))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "['kvtier', 'kvtier.launcher']"


@pytest.mark.parametrize("name", kvtier.__all__)
def test_every_public_name_is_its_home_modules_object(name: str) -> None:
    value = getattr(kvtier, name)
    if name == "__version__":
        assert value == "0.1.0"
        return
    home = importlib.import_module(f"kvtier.{kvtier._HOMES[name]}")
    assert getattr(home, name) is value
    assert name in dir(kvtier)


def test_from_import_and_star_import_give_every_name() -> None:
    namespace: dict[str, object] = {}
    exec("from kvtier import *", namespace)
    assert sorted(n for n in namespace if not n.startswith("__")) == sorted(
        n for n in kvtier.__all__ if n != "__version__")
    from kvtier import KVCacheManager, SequenceSpec
    from kvtier.manager import KVCacheManager as Home
    from kvtier.sequence import SequenceSpec as SpecHome
    assert KVCacheManager is Home and SequenceSpec is SpecHome


def test_an_unknown_name_is_an_attribute_error_naming_it() -> None:
    with pytest.raises(AttributeError, match="module 'kvtier' has no attribute 'KVCache'"):
        _ = kvtier.KVCache  # type: ignore[attr-defined]
    with pytest.raises(ImportError, match="KVCache"):
        exec("from kvtier import KVCache", {})


# A real SIGINT, sent by the child to itself when the import reaches the module named, so the
# interrupt lands inside the CLI's import deterministically (no timing, no flakes).
_INTERRUPT_AT = """
    import os, signal, sys
    class Interrupt:
        def find_spec(self, name, path=None, target=None):
            if name == {module!r}:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None
    sys.meta_path.insert(0, Interrupt())
    from kvtier.launcher import main
    sys.exit(main(["replay", "--limit", "5", "--no-progress"]))
"""


@pytest.mark.parametrize("module", ["kvtier.cli", "argparse", "kvtier.sim.replay",
                                    "kvtier.scheduler"])
def test_ctrl_c_while_the_cli_imports_is_one_line_and_status_130(module: str) -> None:
    out = _child(_INTERRUPT_AT.format(module=module))
    assert (out.returncode, out.stderr, out.stdout) == (EXIT_INTERRUPTED,
                                                        "kvtier: interrupted\n", "")


def test_the_launcher_runs_the_cli() -> None:
    out = _child("""
        import sys
        from kvtier.launcher import main
        sys.exit(main(["replay", "--limit", "3", "--no-oracle",
                       "--no-progress"]))
    """)
    assert out.returncode == 0, out.stderr
    assert '"num_requests": 3' in out.stdout.splitlines()[-1]


def test_python_dash_m_kvtier_goes_through_the_launcher() -> None:
    out = subprocess.run([sys.executable, "-m", "kvtier", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert (out.returncode, out.stdout) == (0, "kvtier 0.1.0\n")
    main_py = Path(kvtier.__file__).with_name("__main__.py")
    assert "from kvtier.launcher import main" in main_py.read_text()
