"""vLLM 0.33.0's real engine ``Scheduler`` and ``OffloadingConnector`` on CPU, configured as
a user configures ``vllm serve --kv-transfer-config``; the test plays the workers.

No model runs and no GPU is touched: after each ``schedule()`` the harness feeds back one
sampled token per scheduled request and reports the previous step's transfer jobs done,
as the worker-side connector would (``OffloadingWorkerMetadata.completed_jobs``;
``finished_recving`` for requests whose loads finished). The KV bytes that a worker would
copy from the GPU into the CPU tier are whatever the CPU tier's pages hold; a test may
write them (``primary_view``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import (
    OffloadingConnectorMetadata,
    OffloadingWorkerMetadata,
)
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.kv_offload.base import OffloadKey, make_offload_key
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK_SIZE = 16
EOS = 2
MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_model")
init_none_hash(sha256)  # vLLM's default: block hashes agree across processes and engines


def kv_transfer_config(cpu_chunks: int, *, eviction_policy: str = "lru",
                       tiers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``--kv-transfer-config`` a user passes (docs/vllm.md), as a dict."""
    extra: dict[str, Any] = {
        "spec_name": "TieringOffloadingSpec",
        # One chunk of the harness's cache is one aligned page (see make_scheduler).
        "cpu_bytes_to_use": cpu_chunks * page_bytes(),
        "eviction_policy": eviction_policy,
        "secondary_tiers": tiers or [],
    }
    if eviction_policy not in ("lru", "arc"):
        extra["cache_policy_module_path"] = "kvtier.integrations.vllm"
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both",
            "kv_connector_extra_config": extra}


def page_bytes() -> int:
    from vllm.v1.kv_offload.cpu.shared_offload_region import SharedOffloadRegion

    return int(SharedOffloadRegion.BLOCK_SIZE_ALIGNMENT)


def make_scheduler(config: dict[str, Any], *, num_gpu_blocks: int = 64,
                   max_num_batched_tokens: int = 512) -> Scheduler:
    """A real engine scheduler with ``config`` as its kv-transfer config (a fresh engine
    id, so two schedulers in one process are two engines)."""
    model = ModelConfig(model=MODEL_DIR, dtype="float16", seed=0, skip_tokenizer_init=True)
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=4096, enable_chunked_prefill=True,
                            is_encoder_decoder=False)
    cache = CacheConfig(block_size=BLOCK_SIZE, gpu_memory_utilization=0.9,
                        enable_prefix_caching=True)
    cache.kv_cache_layout = "LBNHC"  # set before construction, as vLLM's own tests do
    ktc = KVTransferConfig(**config, engine_id=f"kvtier-test-{uuid.uuid4().hex[:12]}")
    cfg = VllmConfig(model_config=model, scheduler_config=sched, cache_config=cache,
                     kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))
    import torch

    kv_cfg = KVCacheConfig(num_blocks=num_gpu_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer.0"], FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1,
                                                         head_size=1, dtype=torch.float32))])
    cfg.cache_config.num_gpu_blocks = num_gpu_blocks
    return Scheduler(vllm_config=cfg, kv_cache_config=kv_cfg, log_stats=True,
                     structured_output_manager=StructuredOutputManager(cfg),
                     block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE)


def make_request(request_id: str, tokens: list[int], max_tokens: int = 1,
                 kv_transfer_params: dict[str, Any] | None = None) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, EOS)
    request = Request(request_id=request_id, prompt_token_ids=tokens, sampling_params=params,
                      pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256))
    if kv_transfer_params is not None:
        request.kv_transfer_params = kv_transfer_params
    return request


def offload_keys(request: Request) -> list[OffloadKey]:
    """The request's full blocks as offload keys (one block per chunk, group 0)."""
    return [make_offload_key(h, 0) for h in request.block_hashes]


class Engine:
    """One scheduler and the jobs its workers have yet to report."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.jobs: dict[int, str | None] = {}  # job id -> request id (loads) or None (stores)
        self.scheduled: list[dict[str, int]] = []  # tokens scheduled per request, per step

    @property
    def manager(self) -> Any:
        return self.scheduler.connector.connector_scheduler.manager

    def step(self) -> dict[str, int]:
        """One engine step: schedule, report last step's jobs done, sample a token each."""
        s = self.scheduler
        out = s.schedule()
        meta = out.kv_connector_metadata
        assert isinstance(meta, OffloadingConnectorMetadata)
        reqs = list(out.num_scheduled_tokens)
        kv_out = None
        if self.jobs:
            loaded = {r for r in self.jobs.values() if r is not None}
            kv_out = KVConnectorOutput(
                finished_recving=loaded or None,
                kv_connector_worker_meta=OffloadingWorkerMetadata(
                    completed_jobs=dict.fromkeys(self.jobs, 1)))
        mro = ModelRunnerOutput(req_ids=reqs, req_id_to_index={r: i for i, r in enumerate(reqs)},
                                sampled_token_ids=[[7] for _ in reqs], logprobs=None,
                                prompt_logprobs_dict={}, pooler_output=None,
                                kv_connector_output=kv_out)
        s.update_from_output(out, mro)
        self.jobs = {j: t.req_id for j, t in meta.load_jobs.items()}
        self.jobs.update(dict.fromkeys(meta.store_jobs))
        scheduled = dict(out.num_scheduled_tokens)
        self.scheduled.append(scheduled)
        return scheduled

    def busy(self) -> bool:
        s = self.scheduler
        return bool(s.has_unfinished_requests() or self.jobs
                    or s.connector.has_pending_push_work() or self.manager.has_pending_work())

    def run(self, max_steps: int = 200, sleep_s: float = 0.001) -> int:
        """Step until nothing is left to do (the network I/O runs meanwhile); the steps."""
        import time

        for n in range(max_steps):
            if not self.busy():
                return n
            self.step()
            time.sleep(sleep_s)
        raise AssertionError(f"engine still busy after {max_steps} steps")

    def shutdown(self) -> None:
        self.scheduler.shutdown()
