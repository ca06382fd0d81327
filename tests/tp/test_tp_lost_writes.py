"""A worker rank's store loses a background write: the leader hears of it and writes the
blocks again. Two gloo ranks on the CPU, each with its own store (its own shards).

Before, a worker dropped its lost hashes after every command: the leader kept those blocks
as held by the store and skipped them in every later write of their prefix, so rank 1's
store never held them and no engine could fetch them whole again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the tensor-parallel tests need torch: "
                                            "pip install 'kvtier[torch]'")
import torch.distributed as dist  # noqa: E402

from kvtier import CacheConfig, KVCacheManager  # noqa: E402
from kvtier.hashing import get_hash_fn, prompt_block_hashes  # noqa: E402
from kvtier.model import LlamaModel, ModelConfig  # noqa: E402
from kvtier.model.tensor_parallel import TensorParallelLlama  # noqa: E402
from kvtier.model.tp_engine import CommandChannel, DistributedRanks, StopCommand, serve  # noqa: E402
from kvtier.remote import InMemoryRemoteStore, RemoteNamespace  # noqa: E402
from kvtier.remote.ranks import RemoteShard  # noqa: E402
from kvtier.remote.tier import RemoteTier  # noqa: E402
from kvtier.storage import KVStorage  # noqa: E402
from kvtier.transfer.torch_engine import TorchTransferEngine  # noqa: E402
from kvtier.transfer.tp_engine import DistributedTransferEngine  # noqa: E402

TP_SIZE = 2
TPB = 4
TOKENS = list(range(3, 15))  # three full blocks
HASHES = prompt_block_hashes(get_hash_fn("sha256"), TOKENS, TPB)


class LosesFirstWrite(InMemoryRemoteStore):
    """A store whose first write takes nothing (a server that dropped it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_dropped = 0

    def write_values(self, pairs: list[tuple[str, bytes]]) -> list[bool]:
        if not self.num_dropped:
            self.num_dropped += 1
            return [False] * len(pairs)
        return super().write_values(pairs)


def rank_main(rank: int, rendezvous: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=TP_SIZE)
    try:
        shard = TensorParallelLlama(LlamaModel(ModelConfig(), "cpu"), rank, TP_SIZE)
        layout = shard.kv_layout(TPB)
        gpu, host = KVStorage(layout, 8, "cpu"), KVStorage(layout, 4)
        gpu.fill_(float(rank + 1))
        namespace = RemoteNamespace("tiny-llama", ModelConfig().kv_layout(TPB))
        store = (LosesFirstWrite if rank == 1 else InMemoryRemoteStore)(
            namespace.for_rank(rank, TP_SIZE))
        remote = RemoteShard(store, gpu, host)
        channel = CommandChannel(None)
        transfer = DistributedTransferEngine(TorchTransferEngine(gpu, host), None)
        saved: dict[str, Any] = {}
        if rank == 0:
            manager = KVCacheManager(CacheConfig(tokens_per_block=TPB, num_gpu_blocks=8,
                                                 num_host_blocks=4, hash_algo="sha256"))
            tier = RemoteTier(DistributedRanks(remote, channel, lost_every_s=0), manager,
                              write_policy="write-through")
            saved["first"] = tier.write(TOKENS, [0, 1, 2], wait=False)
            assert tier.ranks.flush(30.0)
            # The prefix comes back reused: the tier skips what it knows the store holds.
            saved["again"] = tier.write(TOKENS, [0, 1, 2], reused_blocks=3, wait=False)
            assert tier.ranks.flush(30.0)
            saved["third"] = tier.write(TOKENS, [0, 1, 2], reused_blocks=3, wait=False)
            assert tier.ranks.flush(30.0)
            channel.send(StopCommand(0))
        else:
            serve(shard, transfer, channel, remote)
            assert isinstance(store, LosesFirstWrite)
            saved["num_dropped"] = store.num_dropped
        saved["held"] = sorted(h for h in HASHES
                               if store.namespace.key(h) in store.backend)
        torch.save(saved, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_write_a_worker_lost_is_written_again(tmp_path: Path) -> None:
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    torch.multiprocessing.spawn(rank_main, args=args, nprocs=TP_SIZE, join=True)
    leader, worker = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)
                      for r in range(TP_SIZE))
    assert worker["num_dropped"] == 1
    # Written, then rank 1's loss heard at the next write: its 3 blocks written again,
    # then known on every rank and skipped.
    assert (leader["first"], leader["again"], leader["third"]) == (3, 3, 0)
    assert leader["held"] == worker["held"] == sorted(HASHES)
