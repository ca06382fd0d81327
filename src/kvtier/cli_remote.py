"""``--remote-url``: the fleet simulator's shared tier in a real Redis."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvtier.cli_error import CLIError
from kvtier.sim.fleet import stand_in_namespace

if TYPE_CHECKING:
    from kvtier.remote import RedisRemoteStore

CONNECT_TIMEOUT_S = 2.0


def connect_redis(url: str, tokens_per_block: int) -> RedisRemoteStore:
    """A store on the Redis at ``url`` that answered PING; :class:`CLIError` in one sentence
    if redis-py is missing, the URL is invalid or the server does not answer."""
    try:
        from kvtier.remote import RedisRemoteStore
    except ImportError:
        raise CLIError("--remote-url needs redis-py: pip install 'kvtier[redis]'") from None
    try:
        store = RedisRemoteStore(url, stand_in_namespace(tokens_per_block),
                                 timeout_s=CONNECT_TIMEOUT_S)
    except ImportError:
        raise CLIError("--remote-url needs redis-py: pip install 'kvtier[redis]'") from None
    except ValueError as exc:
        raise CLIError(f"invalid --remote-url: {exc}") from None
    problem = store.check_connection()
    if problem is not None:
        store.close()
        raise CLIError(f"cannot use --remote-url: {problem}")
    return store
