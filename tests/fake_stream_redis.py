"""A Redis stand-in for the event stream's tests (no server): the commands the publisher
and subscriber send, in memory. The ``fake_redis`` fixture (``tests/conftest.py``) puts one
in place of every client ``kvtier.stream_client.connect`` makes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier import stream_publisher

_F = TypeVar("_F", bound=Callable[..., Any])


def _command(method: _F) -> _F:
    """A command of the fake: one round trip (its name in ``round_trips``) where the
    caller sent it, none where a pipeline or a script of the fake runs it."""

    @functools.wraps(method)
    def logged(self: FakeRedis, *args: Any, **options: Any) -> Any:
        if not self._depth:
            self.round_trips.append(method.__name__)
        self._depth += 1
        try:
            return method(self, *args, **options)
        finally:
            self._depth -= 1

    return logged  # type: ignore[return-value]


class FakeRedis:
    """The commands of the event stream, in memory: XADD with an exact MAXLEN, XREAD
    (RESP2's shape), XINFO STREAM's first and last entry ids, GET, SET, DEL, the
    publisher's EVAL (each script as Lua runs it) and MULTI/EXEC; ``down`` commands fail
    with a ConnectionError first. ``round_trips``: the name of each command sent, and
    ``pipeline`` for each pipeline executed (its commands in one round trip)."""

    def __init__(self) -> None:
        self.streams: dict[str, list[tuple[bytes, dict[bytes, bytes]]]] = {}
        self.keys: dict[str, bytes] = {}
        self.ttls: dict[str, int | None] = {}  # the EX of each SET
        self.next_id = 1
        self.last_ids: dict[str, bytes] = {}  # each stream's last-generated-id
        self.down = 0
        self.round_trips: list[str] = []
        self._depth = 0  # > 0 while a pipeline or script runs commands

    def _check(self) -> None:
        if self.down:
            import redis

            self.down -= 1
            raise redis.exceptions.ConnectionError("Connection refused")

    @_command
    def xadd(self, stream: str, fields: dict[str, object], maxlen: int | None = None,
             approximate: bool = True) -> bytes:
        self._check()
        entry_id = f"{self.next_id}-0".encode()
        self.next_id += 1
        entries = self.streams.setdefault(stream, [])
        self.last_ids[stream] = entry_id
        entries.append((entry_id, {k.encode(): (v if isinstance(v, bytes) else str(v).encode())
                                   for k, v in fields.items()}))
        if maxlen is not None:
            del entries[:max(0, len(entries) - maxlen)]
        return entry_id

    @_command
    def xread(self, streams: dict[str, object], count: int | None = None,
              block: int | None = None) -> list[object]:
        self._check()
        reply: list[object] = []
        for name, after in streams.items():
            after_id = int(str(after.decode() if isinstance(after, bytes) else after)
                           .partition("-")[0])
            rows = [(i, f) for i, f in self.streams.get(name, [])
                    if int(i.decode().partition("-")[0]) > after_id][:count]
            if rows:
                reply.append([name.encode(), rows])
        return reply

    @_command
    def xinfo_stream(self, stream: str) -> dict[str, object]:
        self._check()
        entries = self.streams.get(stream, [])
        return {"recorded-first-entry-id": entries[0][0] if entries else b"0-0",
                "last-generated-id": self.last_ids.get(stream, b"0-0")}

    def xtrim(self, stream: str, maxlen: int) -> None:
        entries = self.streams.get(stream, [])
        del entries[:max(0, len(entries) - maxlen)]

    @_command
    def get(self, key: str) -> bytes | None:
        self._check()
        return self.keys.get(key)

    @_command
    def set(self, key: str, value: object, ex: int | None = None) -> bool:
        self._check()
        self.keys[key] = value if isinstance(value, bytes) else str(value).encode()
        self.ttls[key] = ex
        return True

    @_command
    def delete(self, *keys: str) -> int:
        self._check()
        return sum(self.keys.pop(k, None) is not None for k in keys)

    @_command
    def eval(self, script: str, numkeys: int, *keys_and_args: str) -> int:
        """The publisher's scripts as Lua runs them. ``_DELETE_UNLESS_OTHERS``: the key
        goes unless its value ends with ``"}`` (names an incarnation) and not with
        ``,"p":<ARGV[1]>}`` (this one's). ``_SET_IF_CLAIMED``: the snapshot is set unless
        the claim names another incarnation. ``_DELETE_CLAIM_IF_MINE``: the claim goes
        where it names this one. ``_RENEW_CLAIM``: the claim set again, with its EX,
        unless it names another."""
        self._check()
        if script == stream_publisher._SET_IF_CLAIMED:
            key, claim_key, snapshot, incarnation, ex = keys_and_args
            claim = self.keys.get(claim_key)
            if claim is not None and claim != incarnation.encode():
                return 0
            self.set(key, snapshot, ex=None if ex == "0" else int(ex))
            return 1
        if script == stream_publisher._RENEW_CLAIM:
            claim_key, incarnation, ex = keys_and_args
            if self.keys.get(claim_key) not in (None, incarnation.encode()):
                return 0
            self.set(claim_key, incarnation, ex=int(ex))
            return 1
        if script == stream_publisher._DELETE_CLAIM_IF_MINE:
            claim_key, incarnation = keys_and_args
            if self.keys.get(claim_key) != incarnation.encode():
                return 0
            return self.delete(claim_key)
        assert script == stream_publisher._DELETE_UNLESS_OTHERS and numkeys == 1
        key, incarnation = keys_and_args
        raw = self.keys.get(key)
        if raw is None:
            return 0
        if raw.endswith(b'"}') and not raw.endswith(f',"p":{incarnation}}}'.encode()):
            return 0
        return self.delete(key)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)


class FakePipeline:
    """MULTI/EXEC, or a pipeline: the queued commands run on execute, all or (Redis
    down) none."""

    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.queued: list[tuple[str, tuple[object, ...], dict[str, object]]] = []

    def delete(self, *args: object, **options: object) -> None:
        self.queued.append(("delete", args, options))

    def set(self, *args: object, **options: object) -> None:
        self.queued.append(("set", args, options))

    def xadd(self, *args: object, **options: object) -> None:
        self.queued.append(("xadd", args, options))

    def eval(self, *args: object, **options: object) -> None:
        self.queued.append(("eval", args, options))

    def xinfo_stream(self, *args: object, **options: object) -> None:
        self.queued.append(("xinfo_stream", args, options))

    def get(self, *args: object, **options: object) -> None:
        self.queued.append(("get", args, options))

    def xread(self, *args: object, **options: object) -> None:
        self.queued.append(("xread", args, options))

    def execute(self, raise_on_error: bool = True) -> list[object]:
        self.client._check()
        self.client.round_trips.append("pipeline")
        self.client._depth += 1
        try:
            return [getattr(self.client, name)(*args, **options)
                    for name, args, options in self.queued]
        finally:
            self.client._depth -= 1
