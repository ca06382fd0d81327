"""Parts an object is built from and checked against: set once, never replaced.

An engine, a scheduler or a remote tier checks its parts against each other when it is
built (the scheduler runs on the engine's manager, the remote tier moves the transfer
engine's own storages) and then holds requests, fetches and plans made on those parts.
Assigning another part afterwards bypassed every check and stranded that state: an
engine whose ``remote`` was replaced kept requests held for fetches the old tier would
finish, and wrote the new tier's store from storages it was never checked against.
:class:`Wired` refuses it, naming the attribute, and changes nothing.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["Wired"]


class Wired:
    """A mixin: the attributes named in ``WIRED`` are set once (in ``__init__``) and then
    refused with AttributeError; every other attribute is as usual."""

    __slots__ = ()
    WIRED: ClassVar[frozenset[str]] = frozenset()

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.WIRED and name in self.__dict__:
            raise AttributeError(
                f"{type(self).__name__}.{name} is a part it was built from and checked "
                f"against, with state held on it: build a new {type(self).__name__} "
                f"instead of replacing it")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in self.WIRED:
            raise AttributeError(f"{type(self).__name__}.{name} is a part it was built "
                                 f"from: it cannot be deleted")
        object.__delattr__(self, name)
