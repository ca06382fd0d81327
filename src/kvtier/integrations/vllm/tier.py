"""``KvtierRedisTier``: kvtier's Redis / Valkey / Redis Cluster store as a secondary tier of
vLLM 0.33.0's ``TieringOffloadingSpec`` (behind vLLM's CPU tier)::

    GPU ──vLLM's worker──> CPU tier (primary_kv_view) ──submit_store──> Redis
    GPU <──vLLM's worker── CPU tier <──────────────────submit_load──── Redis

Selected with ``"secondary_tiers": [{"type": "KvtierRedisTier", "module_path":
"kvtier.integrations.vllm", "url": "redis://...", ...}]`` (docs/vllm.md). The mechanics
are ``StoreTier``'s; this class turns vLLM's calls and types into its calls and back.
Every method runs in vLLM's scheduler process under the tiering manager's lock and returns
without waiting on the network.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from vllm.v1.kv_offload.base import (
    Locality,
    LookupResult,
    Medium,
    OffloadKey,
    ReqContext,
    RequestOffloadingContext,
    ScheduleEndContext,
)
from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from kvtier.integrations.vllm.keys import EngineLayout
from kvtier.integrations.vllm.store_tier import StoreTier, TierStats
from kvtier.remote.codec import RemoteNamespace
from kvtier.remote.redis_store import RedisRemoteStore
from kvtier.remote.redis_url import redact_url
from kvtier.remote.store import RemoteStore
from kvtier.reprs import shown

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

logger = logging.getLogger(__name__)

_VERDICTS = {"hit": LookupResult.HIT, "miss": LookupResult.MISS, "retry": LookupResult.RETRY}
# The options of the tier's JSON object: the tier's own (``backpressure`` is vLLM's), then
# those it hands to RedisRemoteStore.
_TIER_OPTIONS = frozenset({"url", "tenant", "max_lookup_wait_s", "max_queued_jobs",
                           "locality", "backpressure"})
_REDIS_OPTIONS = frozenset(inspect.signature(RedisRemoteStore).parameters) - {"url",
                                                                              "namespace"}


def _shown_url(url: object) -> str:
    """``url`` for a message: a str with its password redacted. Pure."""
    return shown(redact_url(url)) if isinstance(url, str) else shown(url)


def engine_layout(offloading_spec: OffloadingSpec, page_bytes: int) -> EngineLayout:
    """The namespace inputs of the engine ``offloading_spec`` configures. Pure."""
    config = offloading_spec.config
    parallel = config.parallel
    return EngineLayout(
        model=config.model.name, kv_dtype=str(config.model.dtype), page_bytes=page_bytes,
        tokens_per_hash=config.cache.tokens_per_hash,
        blocks_per_chunk=config.cache.blocks_per_chunk,
        groups=tuple((g.tokens_per_block, len(g.layer_names)) for g in config.groups),
        tp_size=parallel.tp_size, pp_size=parallel.pp_size, pcp_size=parallel.pcp_size,
        dcp_size=parallel.dcp_size, rank=parallel.rank,
        replicated_layout=bool(config.replicated_layout),
        kv_cache_layout=config.kv_cache_layout, canonical_layout=bool(config.canonical_layout))


class KvtierRedisTier(SecondaryTierManager):  # type: ignore[misc]
    """A vLLM secondary tier on a kvtier remote store.

    Tier options (the tier's JSON object; all but ``url`` optional):
    ``url`` (``redis://``, ``rediss://`` for TLS, ``unix://``; user and password in it for
    ACL), ``cluster`` (Redis Cluster), ``ttl_s``, ``timeout_s``, ``max_retries``,
    ``backoff_s``, ``breaker_threshold``, ``cooldown_s``, ``ca_file`` (as
    ``RedisRemoteStore``), ``tenant`` (scopes the namespace), ``max_lookup_wait_s`` (a
    probe slower than this is a MISS), ``max_queued_jobs``, ``locality``
    (``"REMOTE"``, the default, or ``"LOCAL"``). ``store`` (Python only, not JSON): any
    ``RemoteStore`` of the right namespace instead of a URL, for tests.
    """

    medium: ClassVar[Medium] = Medium.STORAGE
    cache_hit_source: ClassVar[CacheHitSource] = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, offloading_spec: OffloadingSpec, primary_kv_view: memoryview,
                 tier_type: str, backpressure_detector: BackpressureDetector | None = None,
                 *, url: str | None = None, store: RemoteStore | None = None,
                 tenant: str | None = None, max_lookup_wait_s: float = 0.1,
                 max_queued_jobs: int = 256, locality: str = "REMOTE",
                 **redis_options: Any) -> None:
        super().__init__(offloading_spec=offloading_spec, primary_kv_view=primary_kv_view,
                         tier_type=tier_type, backpressure_detector=backpressure_detector)
        page_bytes = self.block_size_bytes
        self.namespace = engine_layout(offloading_spec, page_bytes).namespace(tenant)
        try:
            self.locality = Locality(locality)
        except ValueError:
            raise ValueError(f"locality must be one of {[m.value for m in Locality]}, "
                             f"got {shown(locality)}") from None
        if (url is None) == (store is None):
            # NOTE: the URL redacted, the store by its type: the URL's password was in the
            # message, which vLLM logs, and a store's repr may hold its URL.
            raise ValueError("KvtierRedisTier needs exactly one of url (a redis:// URL) and "
                             f"store, got url={_shown_url(url)} and store="
                             f"{'None' if store is None else type(store).__name__}")
        if store is not None and not isinstance(getattr(store, "namespace", None),
                                                RemoteNamespace):
            # NOTE: a "store" in the tier's JSON object raised AttributeError ('dict' object
            # has no attribute 'namespace'), naming no option.
            raise ValueError(f"store must be a kvtier RemoteStore (Python only; a JSON "
                             f"config names a url), got {type(store).__name__}")
        if store is None:
            unknown = sorted(set(redis_options) - _REDIS_OPTIONS)
            if unknown:
                # NOTE: was a TypeError from RedisRemoteStore's signature, naming the
                # misspelt option but none of the tier's.
                raise ValueError(f"unknown KvtierRedisTier option(s) {unknown}; the options "
                                 f"are {sorted(_TIER_OPTIONS | _REDIS_OPTIONS)}")
            store = RedisRemoteStore(url, self.namespace, **redis_options)  # type: ignore[arg-type]
        elif redis_options:
            raise ValueError(f"options {sorted(redis_options)} are for a url, not a store")
        elif store.namespace != self.namespace:
            raise ValueError("store's namespace is not this engine's (model, dtype, page "
                             "bytes or parallel layout differ)")
        self.store: RemoteStore = store
        self._owns_store = url is not None
        # NOTE: a view of our own, released at shutdown: vLLM unlinks the CPU tier's shared
        # file only when no exported view of it is left.
        view = primary_kv_view.cast("B")
        self._view = view
        try:
            self.tier = StoreTier(store, view, page_bytes, max_lookup_wait_s=max_lookup_wait_s,
                                  max_queued_jobs=max_queued_jobs)
        except BaseException:
            # NOTE: an option refused here (max_lookup_wait_s, max_queued_jobs) left the
            # store this tier opened open, and the CPU tier's file exported (never unlinked).
            view.release()
            if self._owns_store:
                store.close()
            raise
        logger.info("kvtier tier %s: %s, namespace %s, %d-byte pages", tier_type,
                    redact_url(url) if url else type(store).__name__,
                    self.namespace.fingerprint, page_bytes)

    @property
    def stats(self) -> TierStats:
        """The tier's counters and latency samples. Pure."""
        return self.tier.stats

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        return _VERDICTS[self.tier.lookup(key, req_context.req_id)]

    def submit_store(self, job_metadata: TransferJob) -> None:
        self.tier.submit_store(job_metadata.job_id, list(job_metadata.keys),
                               job_metadata.chunk_ids.tolist())

    def submit_load(self, job_metadata: TransferJob) -> None:
        self.tier.submit_load(job_metadata.job_id, list(job_metadata.keys),
                              job_metadata.chunk_ids.tolist())

    def get_finished_jobs(self) -> Iterable[JobResult]:
        return [JobResult(job_id=o.job_id, success=o.success,
                          successful_keys=o.successful_keys, transfer_time=o.transfer_s,
                          transfer_bytes=o.transfer_bytes)
                for o in self.tier.finished_jobs()]

    def has_pending_work(self) -> bool:
        return self.tier.has_pending_work()

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        # NOTE: vLLM 0.33.0 hands a tier no keys here (a request's offload keys are made at
        # its first lookup scan), so the chain's probe starts with that scan: every chunk of
        # it is asked for in the same step (the connector keeps scanning past a RETRY) and
        # sent as one batch at the step's end.
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self.tier.request_finished(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self.tier.flush()

    def drain_jobs(self) -> None:
        self.tier.drain()

    def shutdown(self) -> None:
        self.tier.close()
        if self._owns_store:
            self.store.close()
        self._view.release()
