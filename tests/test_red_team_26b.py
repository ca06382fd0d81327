"""Red team 26b, the router: what a decision and the stats promise is what a manager
reuses."""

from __future__ import annotations

from kvtier import CacheConfig, KVCacheManager
from kvtier.events import BlockStored
from kvtier.router import (
    CacheAware,
    InstanceLoad,
    PrefixHit,
    RouteDecision,
    Router,
    RouterStats,
)
from kvtier.sequence import SequenceSpec
from kvtier.tier import Tier


def _stored(router: Router, instance: str, tokens: list[int]) -> None:
    hashes = router.block_hashes(tokens)
    router.index.apply(instance, [
        BlockStored(i, h, hashes[i - 1] if i else None, Tier.GPU, 4, None,
                    tuple(tokens[4 * i:4 * i + 4]), None, None) for i, h in enumerate(hashes)])


def test_the_block_holding_the_last_token_is_no_predicted_hit() -> None:
    """A block-aligned prompt whose every block an instance holds: the manager reuses all
    but the block holding its last token (that token is computed), so the decision and
    the stats promise one block less than the index holds."""
    router = Router(CacheAware(), 4)
    tokens = list(range(8))
    _stored(router, "a", tokens)
    offered = [InstanceLoad("a", 0, 4), InstanceLoad("b", 0, 4)]
    decision = router.route(tokens, offered)
    # Before: PrefixHit(2, 0) and 2 predicted blocks, one more than any manager reuses whole.
    assert decision == RouteDecision("a", 2, PrefixHit(1, 0), 1)
    assert router.stats == RouterStats(num_routed=1, num_with_prefix=1, num_best_prefix=1,
                                       num_predicted_hit_blocks=1, num_prompt_blocks=2,
                                       per_instance={"a": 1})
    # The reference: a manager holding the same blocks reuses one whole block (4 tokens)
    # without partial reuse.
    manager = KVCacheManager(CacheConfig(tokens_per_block=4, num_gpu_blocks=8,
                                         enable_partial_reuse=False))
    manager.add_sequence(SequenceSpec("r0", tokens))
    manager.remove_sequence("r0")
    assert manager.lookup(tokens).num_tokens == 4


def test_a_prompt_past_its_cached_blocks_keeps_every_block_it_reuses() -> None:
    """A prompt one token past the cached blocks reuses both whole: both promised; the
    cut comes off the deepest (host) blocks first."""
    router = Router(CacheAware(), 4)
    _stored(router, "a", list(range(8)))
    offered = [InstanceLoad("a", 0, 4)]
    assert router.route(list(range(9)), offered).hit == PrefixHit(2, 0)
    host = Router(CacheAware(), 4)
    hashes = host.block_hashes(list(range(8)))
    host.index.apply("a", [BlockStored(0, hashes[0], None, Tier.GPU, 4, None, (0, 1, 2, 3),
                                       None, None),
                           BlockStored(1, hashes[1], hashes[0], Tier.HOST, 4, None,
                                       (4, 5, 6, 7), None, None)])
    assert host.index.match(host.block_hashes(list(range(8)))) == {"a": PrefixHit(1, 1)}
    assert host.route(list(range(8)), offered).hit == PrefixHit(1, 0)
    assert host.route(list(range(9)), offered).hit == PrefixHit(1, 1)
