"""Red team 33a: values read back from Redis that a store must refuse though their
checksum holds: written by hand, each with a header and checksum computed as a writer's
would be, naming the wrong length, dtype, block size, token count or another model's
layout. Each is a miss counted by its reason, never served.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from remote_helpers import RedisServers, make_blocks, make_namespace

from kvtier.remote import RedisRemoteStore, RemoteNamespace
from kvtier.remote.codec import _CHECKSUM, _DTYPE_CODES, _FIELDS, _LAYOUT_CODES, MAGIC, _checksum
from kvtier.storage import KVLayout


def forge(namespace: RemoteNamespace, block_hash: int, payload: bytes, *,
          num_tokens: int | None = None, layout: KVLayout | None = None,
          dtype_code: int | None = None, layout_code: int | None = None) -> bytes:
    """A value as a writer makes it (its checksum sound), with the fields given."""
    layout = layout or namespace.layout
    head = _FIELDS.pack(
        MAGIC, 1, bytes.fromhex(namespace.fingerprint), block_hash.to_bytes(16, "big"),
        layout.tokens_per_block if num_tokens is None else num_tokens,
        layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.tokens_per_block,
        _DTYPE_CODES[layout.dtype] if dtype_code is None else dtype_code,
        _LAYOUT_CODES[layout.layout] if layout_code is None else layout_code, len(payload))
    return head + _CHECKSUM.pack(_checksum(head, payload)) + payload


@pytest.fixture
def raw(redis_servers: RedisServers) -> Iterator[Any]:
    """A plain redis-py client of the shared standalone server, to write values by hand."""
    import redis

    client = redis.Redis.from_url(redis_servers.url)
    yield client
    client.close()


def test_hand_written_values_of_another_shape_are_refused(redis_servers: RedisServers,
                                                          raw: Any) -> None:
    """Nine values written by hand under blocks 2..10's keys, each checksum sound: a
    payload a byte long or short (the header saying so), another dtype (float32's code, an
    unknown code), a block of 8 tokens, another memory layout code, a partial block's
    token count, a value of another model (more heads), and of this model in float32.
    Each is a miss counted by its reason; only block 1 is served. (No defect found: this
    pins what the codec refuses, through the server.)"""
    namespace = make_namespace()
    store = RedisRemoteStore(redis_servers.url, namespace, timeout_s=1.0)
    good = make_blocks(namespace, 1)
    assert store.put_many(good) == 1, store.last_error
    payload = good[1]
    layout = namespace.layout
    other_model = RemoteNamespace(namespace.model_id + "-b", replace(layout, num_kv_heads=4))
    as_float32 = RemoteNamespace(namespace.model_id, replace(layout, dtype="float32"))
    other_dtype = next(code for name, code in _DTYPE_CODES.items() if name != layout.dtype)
    other_layout = next(code for name, code in _LAYOUT_CODES.items() if name != layout.layout)
    values = {
        2: forge(namespace, 2, payload + b"\0"),
        3: forge(namespace, 3, payload[:-1]),
        4: forge(namespace, 4, payload, dtype_code=other_dtype),
        5: forge(namespace, 5, payload, dtype_code=200),
        6: forge(namespace, 6, payload[:len(payload) // 2],
                 layout=replace(layout, tokens_per_block=8)),
        7: forge(namespace, 7, payload, layout_code=other_layout),
        8: forge(namespace, 8, payload, num_tokens=layout.tokens_per_block - 1),
        9: other_model.encode(9, bytes(other_model.layout.bytes_per_block)),
        10: as_float32.encode(10, bytes(as_float32.layout.bytes_per_block)),
    }
    for block_hash, value in values.items():
        raw.set(namespace.key(block_hash), value)
    assert store.get_many(range(1, 11)) == good
    assert store.stats.bad_payload_reasons == {
        "length": 2, "layout": 4, "num_tokens": 1, "namespace": 2}
    assert (store.stats.num_hits, store.stats.num_bad_payloads, store.stats.num_misses) \
        == (1, 9, 9)
    store.close()
