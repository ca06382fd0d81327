"""Red team, eleventh pass: the remote store's and tier's waits and settings, given values a
caller may well pass (infinity for "no limit") or a hostile one."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from kvtier import CacheConfig, KVCacheManager
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace
from kvtier.remote.tier import RemoteTier
from kvtier.storage import KVLayout

TPB = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, tokens_per_block=TPB)
PROMPT = list(range(10, 31))  # 5 full blocks and one token


@pytest.fixture
def busy_store() -> Iterator[tuple[InMemoryRemoteStore, threading.Event]]:
    """A store whose I/O thread runs a job until the event is set."""
    store = InMemoryRemoteStore(RemoteNamespace("m", LAYOUT))
    release, started = threading.Event(), threading.Event()

    def callback(found: object) -> None:
        started.set()
        release.wait(10.0)

    assert store.prefetch([1], callback)
    assert started.wait(10.0)
    yield store, release
    release.set()
    store.close()


def test_flush_with_no_limit_waits_instead_of_overflowing(
        busy_store: tuple[InMemoryRemoteStore, threading.Event]) -> None:
    """store.flush(float('inf')) or flush(1e300) raised OverflowError ("timestamp out of
    range") from the condition's wait. Now infinity means no limit, like None."""
    store, release = busy_store
    threading.Timer(0.05, release.set).start()
    assert store.flush(float("inf")) is True
    assert store.flush(1e300) is True


@pytest.mark.parametrize("timeout", [float("nan"), -1.0, "1", True])
def test_flush_refuses_a_timeout_that_is_no_number_of_seconds(
        busy_store: tuple[InMemoryRemoteStore, threading.Event], timeout: object) -> None:
    """flush(nan) answered True at once, as if every job had run, while one was running;
    flush('1') raised TypeError from the arithmetic inside. Now ValueError naming it."""
    store, _ = busy_store
    with pytest.raises(ValueError, match=r"timeout must be a number of seconds >= 0 or None"):
        store.flush(timeout)  # type: ignore[arg-type]
    assert store.flush(0.0) is False  # the job still runs: nothing was skipped


def make_tier() -> RemoteTier:
    """A remote tier over an in-memory store, on tiny CPU storages."""
    pytest.importorskip("torch", reason="the remote tier moves real KV: needs torch")
    from kvtier.storage import KVStorage

    manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                         num_host_blocks=8, hash_algo="sha256"))
    return RemoteTier(InMemoryRemoteStore(RemoteNamespace("m", LAYOUT)), manager,
                      KVStorage(LAYOUT, 8, "cpu"), KVStorage(LAYOUT, 8), fetch_deadline_s=1.0)


@pytest.mark.parametrize(("name", "value"), [
    ("fetch_deadline_s", float("nan")), ("fetch_deadline_s", -1.0),
    ("fetch_deadline_s", 1e9), ("recompute_s_per_token", float("nan")),
    ("fetch_latency_s", float("inf")), ("fetch_latency_s", True),
])
def test_remote_tier_settings_are_checked_when_set(name: str, value: object) -> None:
    """Checked only by the constructor: a NaN fetch_deadline_s set later held every fetching
    request for ever (``now - started >= nan`` is never true); a NaN cost raised from the
    next start_fetch, inside the engine's step. Now ValueError naming it, the old value
    kept."""
    tier = make_tier()
    before = getattr(tier, name)
    with pytest.raises(ValueError, match=rf"{name} must be a finite number"):
        setattr(tier, name, value)
    assert getattr(tier, name) == before


@pytest.mark.parametrize("call", ["wait", "flush"])
def test_remote_tier_waits_check_their_timeout(call: str) -> None:
    """RemoteTier.wait('x') and flush('x') went on to the ranks (flush: TypeError from its
    arithmetic); wait(inf) with a fetch in flight: OverflowError. Now ValueError for what
    is no number of seconds, and infinity is no limit."""
    tier = make_tier()
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds >= 0"):
        getattr(tier, call)("x")
    with pytest.raises(ValueError, match=r"timeout_s must be a number of seconds >= 0"):
        getattr(tier, call)(float("nan"))
    assert getattr(tier, call)(float("inf")) in (None, True)


def test_remote_tier_wait_without_limit_returns_when_the_fetch_arrives() -> None:
    """wait(float('inf')) with a fetch in flight raised OverflowError."""
    tier = make_tier()
    tier.gpu.tensors[0].fill_(1.0)
    assert tier.write(PROMPT, [0, 1, 2, 3, 4], wait=True) == 5
    tier.manager.reset_cache()
    assert tier.start_fetch("r", PROMPT)
    tier.wait(float("inf"))
    assert tier.poll() == ["r"]


@pytest.mark.parametrize("lora_id", ["x", -1, 2.0])
def test_a_write_under_a_lora_id_no_manager_takes_is_refused(lora_id: object) -> None:
    """RemoteTier.write(lora_id='x') stored 5 blocks under hashes no manager can ever match
    (its lookup refuses that lora_id): garbage in the shared store. Now ValueError, nothing
    written."""
    tier = make_tier()
    with pytest.raises(ValueError, match=r"lora_id must be an int"):
        tier.write(PROMPT, [0, 1, 2, 3, 4], lora_id=lora_id, wait=True)  # type: ignore[arg-type]
    assert tier.num_written_blocks == 0
    assert isinstance(tier.store, InMemoryRemoteStore) and tier.store.backend == {}


@pytest.mark.parametrize(("salt", "shown"), [
    ((1, 2), r"salt must be bytes, str, int or None, got \(1, 2\)"),
    (1 << 200, r"salt must be an int of magnitude below 2\*\*128"),
    ("s" * 5000, r"salt must be at most"),
])
def test_a_write_under_a_salt_no_manager_takes_is_refused(salt: object, shown: str) -> None:
    """RemoteTier.write hashed a tuple salt (which the manager refuses) into blocks no
    manager can match, and stored them in the shared store (fetch and start_fetch already
    refused it, through the manager's lookup). Now ValueError as the manager's, nothing
    written."""
    tier = make_tier()
    with pytest.raises(ValueError, match=shown):
        tier.write(PROMPT, [0, 1, 2, 3, 4], salt=salt, wait=True)
    assert tier.num_written_blocks == 0
    assert isinstance(tier.store, InMemoryRemoteStore) and tier.store.backend == {}


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:1/0?password=hunter2", "redis://127.0.0.1:1/0?password=***"),
    ("redis://h/0?db=2&Password=hunter2", "redis://h/0?db=2&Password=***"),
    ("redis://:hunter2@127.0.0.1:99999/0", "redis://:***@127.0.0.1:99999/0"),  # ValueError
    ("rediss://:hunter2@[::1]:1/0", "rediss://:***@[::1]:1/0"),  # was ::1:1
    ("unix:///tmp/s.sock?password=hunter2", "unix:///tmp/s.sock?password=***"),
    ("redis://user:hunter2@h:1/0", "redis://user:***@h:1/0"),
    ("redis://[::1/0", "<a URL that does not parse>"),
    # a parameter not known to hold no secret is shown without its value (red team 16)
    ("redis://h/0?passwd=hunter2&db=1", "redis://h/0?passwd=***&db=1"),
    ("redis://h/0?pasword=hunter2&ssl_cert_reqs=none",
     "redis://h/0?pasword=***&ssl_cert_reqs=none"),
    ("redis://h/0?socket_timeout=3&flag", "redis://h/0?socket_timeout=3&flag"),
])
def test_a_url_is_shown_without_its_password_wherever_it_is(url: str, shown: str) -> None:
    """redact_url showed a password given as a query parameter (redis-py takes it there
    too) in every error message, raised ValueError for a port out of range (status 70 in
    place of the message) and dropped an IPv6 host's brackets."""
    from kvtier.remote.redis_url import redact_url

    assert redact_url(url) == shown


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:1/0?password=hunter2",
     "cannot use --remote-url: redis at redis://127.0.0.1:1/0?password=***"),
    # refused when the store is made since red team 22b (a fault of every batch before)
    ("redis://:hunter2@127.0.0.1:99999/0",
     "invalid --remote-url: url port must be an integer in 1..65535, got "
     "'redis://:***@127.0.0.1:99999/0'"),
])
def test_the_command_line_never_shows_a_remote_urls_password(url: str, shown: str) -> None:
    """``--remote-url redis://...?password=...``: the password was in the one-line error;
    with a port out of range the error itself was an internal error (status 70)."""
    pytest.importorskip("redis")
    from bad_input_helpers import assert_one_line_refusal, run_cli

    code, err = run_cli(["replay", "--limit", "3", "--instances", "2", "--remote", "write-back",
                         "--host-blocks", "64", "--remote-url", url, "--no-progress"])
    assert_one_line_refusal(code, err, shown)
    assert "hunter2" not in err
