"""The block payload codec: round trips, and every kind of bad value refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.remote.codec import (
    HEADER_BYTES,
    BlockHeader,
    PayloadError,
    RemoteNamespace,
    block_key,
    decode_block,
    encode_block,
    namespace_fingerprint,
)
from kvtier.storage import DTYPE_BYTES, LAYOUTS, KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, tokens_per_block=4, dtype="float16")


def make_header(block_hash: int = 7, layout: KVLayout = LAYOUT, model: str = "m") -> BlockHeader:
    """A full-block header of ``model`` in ``layout``."""
    return BlockHeader(namespace_fingerprint(model, layout), block_hash, layout.tokens_per_block,
                       layout)


def make_payload(layout: KVLayout = LAYOUT) -> bytes:
    """One block of distinct bytes."""
    return bytes(i % 251 for i in range(layout.bytes_per_block))


@st.composite
def headers_and_payloads(draw: st.DrawFn) -> tuple[BlockHeader, bytes]:
    layout = KVLayout(
        num_layers=draw(st.integers(1, 3)), num_kv_heads=draw(st.integers(1, 2)),
        head_dim=draw(st.integers(1, 8)), tokens_per_block=draw(st.sampled_from([1, 2, 4])),
        dtype=draw(st.sampled_from(sorted(DTYPE_BYTES))), layout=draw(st.sampled_from(LAYOUTS)))
    header = BlockHeader(
        namespace_fingerprint(draw(st.text(max_size=8)), layout, draw(st.none() | st.text())),
        draw(st.integers(0, (1 << 128) - 1)), draw(st.integers(1, layout.tokens_per_block)),
        layout)
    size = layout.bytes_per_block
    return header, draw(st.binary(min_size=size, max_size=size))


@settings(max_examples=200, deadline=None)
@given(headers_and_payloads())
def test_decode_inverts_encode(case: tuple[BlockHeader, bytes]) -> None:
    """decode(encode(x)) == x for any header and payload."""
    header, payload = case
    assert decode_block(encode_block(header, payload), header) == payload


@settings(max_examples=200, deadline=None)
@given(headers_and_payloads(), st.data())
def test_any_single_byte_flip_is_refused(case: tuple[BlockHeader, bytes],
                                         data: st.DataObject) -> None:
    """Changing any one byte of a value, header or payload, makes it a PayloadError."""
    header, payload = case
    value = bytearray(encode_block(header, payload))
    index = data.draw(st.integers(0, len(value) - 1))
    value[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(PayloadError):
        decode_block(bytes(value), header)


@pytest.mark.parametrize("cut", [0, 10, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 5])
def test_truncated_value_is_refused(cut: int) -> None:
    """A value cut anywhere short of its end is 'truncated'."""
    value = encode_block(make_header(), make_payload())
    with pytest.raises(PayloadError) as info:
        decode_block(value[:cut], make_header())
    assert info.value.reason == "truncated"


def test_extended_value_is_refused() -> None:
    """Extra bytes after the payload are a 'length' error."""
    value = encode_block(make_header(), make_payload())
    with pytest.raises(PayloadError) as info:
        decode_block(value + b"\0", make_header())
    assert info.value.reason == "length"


def test_foreign_namespace_wrong_hash_and_layout_are_refused() -> None:
    """A sound value of another model, block or block shape names the field that differs."""
    value = encode_block(make_header(block_hash=7), make_payload())
    cases = {
        "namespace": make_header(model="other-model"),
        "block_hash": make_header(block_hash=8),
    }
    for reason, expected in cases.items():
        with pytest.raises(PayloadError) as info:
            decode_block(value, expected)
        assert info.value.reason == reason
    other_dtype = KVLayout(2, 2, 4, 4, dtype="bfloat16")
    lying = BlockHeader(make_header().namespace, 7, 4, other_dtype)  # same namespace, other shape
    with pytest.raises(PayloadError) as info:
        decode_block(value, lying)
    assert info.value.reason == "layout"
    partial = BlockHeader(make_header().namespace, 7, 3, LAYOUT)
    with pytest.raises(PayloadError) as info:
        decode_block(value, partial)
    assert info.value.reason == "num_tokens"


def test_wrong_version_and_magic_are_refused() -> None:
    """Another format version or magic is refused before the checksum is trusted."""
    value = bytearray(encode_block(make_header(), make_payload()))
    value[5] += 1  # version, big-endian u16 at offset 4
    with pytest.raises(PayloadError) as info:
        decode_block(bytes(value), make_header())
    assert info.value.reason == "version"
    with pytest.raises(PayloadError) as info:
        decode_block(b"PK\x03\x04" + bytes(value[4:]), make_header())
    assert info.value.reason == "magic"


def test_namespaces_differ_per_model_layout_dtype_and_salt() -> None:
    """Any difference in model, shape, dtype, layout or salt scope changes the fingerprint."""
    fingerprints = {
        namespace_fingerprint("m", LAYOUT),
        namespace_fingerprint("m2", LAYOUT),
        namespace_fingerprint("m", KVLayout(2, 2, 4, 8, dtype="float16")),
        namespace_fingerprint("m", KVLayout(2, 2, 4, 4, dtype="bfloat16")),
        namespace_fingerprint("m", KVLayout(2, 2, 4, 4, dtype="float16", layout="layer_major")),
        namespace_fingerprint("m", LAYOUT, salt_scope="tenant-a"),
        namespace_fingerprint("m", LAYOUT, salt_scope="tenant-b"),
    }
    assert len(fingerprints) == 7
    assert namespace_fingerprint("m", LAYOUT) == namespace_fingerprint("m", LAYOUT)


def test_key_format_and_namespace_helpers() -> None:
    """Keys are kvtier:{namespace}:{hash as 32 hex digits}; RemoteNamespace round-trips."""
    ns = RemoteNamespace("m", LAYOUT)
    assert ns.key(255) == block_key(ns.fingerprint, 255) == f"kvtier:{ns.fingerprint}:{255:032x}"
    assert ns.decode(3, ns.encode(3, make_payload())) == make_payload()


def test_decode_hands_a_view_of_the_value_not_a_copy() -> None:
    """The payload is a read-only view into the stored value (no copy); a bytearray is
    checked and served as an immutable snapshot: changing it later changes nothing."""
    ns = RemoteNamespace("m", LAYOUT)
    value = ns.encode(3, make_payload())
    payload = ns.decode(3, value)
    assert isinstance(payload, memoryview) and payload.readonly
    assert payload.obj is value and payload == make_payload()
    mutable = bytearray(value)
    served = ns.decode(3, mutable)
    mutable[-1] ^= 0xFF
    assert served == make_payload()


def test_encode_rejects_a_payload_of_the_wrong_size() -> None:
    """Encoding a payload that is not one block raises with both sizes in the message."""
    with pytest.raises(ValueError, match=f"must be {LAYOUT.bytes_per_block} bytes"):
        encode_block(make_header(), b"short")
