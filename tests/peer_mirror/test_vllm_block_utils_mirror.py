"""vLLM's ``tests/v1/core/test_kv_cache_utils.py`` cases not mirrored yet, against kvtier:
the free queue's ``popleft_n`` order for blocks that were never cached, and the request
block hasher (``hash_request_tokens`` / ``get_request_block_hasher``) with a partial last
block and blocks that fill as the request decodes.

Each test names the vLLM test it mirrors (vllm-project/vllm) and asserts kvtier's exact
answer. vLLM's ``test_prefix_caching.py::test_eagle*`` (a hit drops its last matched block
so the drafter can recompute its hidden states) has no counterpart: kvtier knows no
drafter; a spec-decode engine asks for one block less itself. Rejected draft tokens
(``test_prefix_not_cached_if_spec_decode``-like) are mirrored in
``test_trtllm_mirror.py::test_rejected_draft_tokens_are_never_stored_or_reused``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from kvtier import BlockStored
from kvtier.hashing import get_hash_fn, prompt_block_hashes
from peer_mirror.mirror_helpers import admit, cached_slots, hit, make_manager, release


def test_blocks_nobody_cached_are_reused_last_freed_first() -> None:
    """Mirrors test_kv_cache_utils.py::test_free_kv_cache_block_queue_popleft_n with vLLM's
    ``BlockPool.free_blocks`` (blocks without a hash are prepended: LIFO reuse): with
    caching off, request a holds slots (0, 1) and b (2, 3, 4); both are freed (b, then a,
    each tail first) and the next two requests take slots in the order they were freed
    last-first: (0, 1, 2) then (3, 4). vLLM would hand out (1, 0, 4) then (3, 2): its
    ``prepend_n`` keeps one request's freed blocks in their (reversed) order, where kvtier's
    free list is a plain stack and so gives a request's head back first (a deliberate
    difference: which free slot a request gets changes no hit and no count)."""
    mgr = make_manager(num_gpu_blocks=6, enable_block_reuse=False)
    assert admit(mgr, "a", list(range(8))).block_ids == (0, 1)
    assert admit(mgr, "b", list(range(8, 20))).block_ids == (2, 3, 4)
    release(mgr, "b", "a")
    assert mgr.num_free_gpu_blocks == 6 and mgr.cached_blocks() == []
    assert admit(mgr, "c", list(range(100, 112))).block_ids == (0, 1, 2)
    assert admit(mgr, "d", list(range(200, 208))).block_ids == (3, 4)
    assert mgr.num_free_gpu_blocks == 1  # slot 5, never used, is still at the bottom
    assert admit(mgr, "e", [7, 7]).block_ids == (5,)


def test_a_request_s_block_hashes_cover_full_blocks_and_grow_as_it_decodes() -> None:
    """Mirrors test_kv_cache_utils.py::test_hash_request_tokens and
    test_request_block_hasher (a 10-token prompt of blocks of 4 under a LoRA hashes 2
    blocks; the partial third gets its hash only once two decoded tokens fill it, chained on
    the second; a thirteenth token starts a block and hashes nothing): kvtier's stored
    blocks carry exactly the hash chain ``prompt_block_hashes`` gives for the tokens so far,
    LoRA id included."""
    mgr = make_manager(num_gpu_blocks=8, enable_events=True)
    hash_fn = get_hash_fn(mgr.config.hash_algo)
    prompt = list(range(10))
    admit(mgr, "r", prompt, lora_id=3)
    want = prompt_block_hashes(hash_fn, prompt, 4, lora_id=3)
    assert len(want) == 2
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [(e.block_hash, e.parent_hash, e.token_ids, e.lora_id) for e in stored] == [
        (want[0], None, (0, 1, 2, 3), 3), (want[1], want[0], (4, 5, 6, 7), 3)]
    assert mgr.append_tokens("r", [10, 11]) == []  # fills block 2 in place
    longer = prompt_block_hashes(hash_fn, [*prompt, 10, 11], 4, lora_id=3)
    assert longer[:2] == want and len(longer) == 3
    stored = [e for e in mgr.drain_events() if isinstance(e, BlockStored)]
    assert [(e.block_hash, e.parent_hash, e.token_ids) for e in stored] == [
        (longer[2], want[1], (8, 9, 10, 11))]
    assert mgr.append_tokens("r", [12]) == [3]  # a new block, partial: no hash
    assert mgr.drain_events() == []
    assert [b.block_hash for b in mgr.cached_blocks()] == longer
    assert cached_slots(mgr) == [0, 1, 2]
    release(mgr, "r")
    assert hit(mgr, [*prompt, 10, 11, 12, 0], lora_id=3) == 12
    assert hit(mgr, [*prompt, 10, 11, 12, 0]) == 0  # another key space: no LoRA


def test_block_hashes_are_the_same_in_every_process_and_differ_by_algorithm() -> None:
    """Mirrors test_kv_cache_utils.py::test_none_hash and test_hash_block_tokens (the
    chain's seed ``NONE_HASH`` is fixed only when PYTHONHASHSEED is set; sha256 and the
    default hash name a block differently): kvtier's chain has no random seed, so a process
    started with another PYTHONHASHSEED names a prompt's blocks exactly as this one does (a
    deliberate difference: a router or a remote tier in another process must find the
    blocks by name), and ``sha256`` gives another chain of the same length."""
    prompt = list(range(10))
    here = prompt_block_hashes(get_hash_fn("xxh3_128"), prompt, 4, salt="s")
    code = ("from kvtier.hashing import get_hash_fn, prompt_block_hashes;"
            "print(prompt_block_hashes(get_hash_fn('xxh3_128'), list(range(10)), 4, salt='s'))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == str(here)
    other = prompt_block_hashes(get_hash_fn("sha256"), prompt, 4, salt="s")
    assert len(other) == len(here) == 2 and not set(other) & set(here)
    mgr = make_manager(num_gpu_blocks=4, hash_algo="sha256")
    admit(mgr, "r", prompt, salt="s")
    assert [b.block_hash for b in mgr.cached_blocks()] == other


def test_chunks_cache_the_full_blocks_they_complete_and_only_those() -> None:
    """Mirrors test_prefix_caching.py::test_cache_blocks (a 14-token request with blocks of
    4: ``cache_full_blocks`` from 0 to 2 full blocks caches 2, from 2 to 3 caches one more;
    the 2-token tail block is never cached): kvtier's manager caches what each scheduled
    chunk completes, the hashes being the prompt's chain."""
    mgr = make_manager(num_gpu_blocks=5, enable_events=True)
    hash_fn = get_hash_fn(mgr.config.hash_algo)
    prompt = list(range(14))
    want = prompt_block_hashes(hash_fn, prompt, 4)
    adm = admit(mgr, "0", prompt, num_new_tokens=8)
    assert adm.block_ids == (0, 1)  # the chunk's blocks, as vLLM allocates them
    assert [b.block_hash for b in mgr.cached_blocks()] == want[:2]
    mgr.schedule_prefill("0", 4)
    mgr.check_invariants()
    assert mgr.block_table("0") == [0, 1, 2]
    assert [b.block_hash for b in mgr.cached_blocks()] == want
    mgr.schedule_prefill("0", 2)  # the tail: no full block
    assert mgr.block_table("0") == [0, 1, 2, 3]
    assert [b.block_hash for b in mgr.cached_blocks()] == want
    assert len(want) == 3 and cached_slots(mgr) == [0, 1, 2]
    assert [e.token_ids for e in mgr.drain_events() if isinstance(e, BlockStored)] == [
        (0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
