"""The held LRU tenure (fifteenth session): a witness whose evidence fades only with the
learned order's own tenure, its verdicts on a scripted stream against a plain reference;
the sealed form that counts nothing in LRU's order; the stratified veto as the held
tenure's exit (the witness fades again while it rules); the figures on the first 200
agentic steps."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policy_lab.tenure import (
    HeldTenure,
    HeldVeto,
    HeldWitness,
    MissWitness,
    SealedWitness,
    run,
)

from kvtier.config import CacheConfig
from kvtier.witness import LruWitness, Z

# A script of the witness's events: ("rel", tick, blocks) a run released at ``tick``
# (new); ("lost", tick, blocks) a run released at ``tick`` and dropped, come back for
# (LRU would still hold it: the room below is never exceeded); ("adm", blocks, 0) a
# request of ``blocks`` prompt blocks admitted on nothing cached.
SCRIPT = [("rel", 1, 2), ("rel", 2, 3), ("rel", 3, 2), ("rel", 4, 1),
          ("lost", 1, 2), ("adm", 3, 0), ("lost", 2, 3),     # -5 against sqrt(13): LRU
          ("adm", 4, 0), ("adm", 4, 0),                      # plain: fades back within
          ("lost", 3, 2), ("adm", 8, 0), ("adm", 8, 0), ("lost", 4, 1), ("adm", 8, 0)]
CAPACITY, WINDOW, ROOM = 4, 8, 100


def reference(script: list[tuple[str, int, int]], held: bool, sealed: bool = False,
              lru_rules: bool | None = None) -> list[tuple[float, float, bool]]:
    """The witness's lead, volume and verdict after each step, written plainly: a lost
    run counts ``-blocks`` (its square to the volume) unless sealed in LRU's order; an
    admission adds its blocks to the fade's count unless held in LRU's order; the count
    at the window halves both. ``lru_rules``: who ranks, if not the verdict (a veto)."""
    lead = volume = 0.0
    ahead = False
    traffic = 0
    out = []
    for op, a, b in script:
        ruling = ahead if lru_rules is None else lru_rules
        if op == "lost" and not (sealed and ruling):
            lead -= b
            volume += b * b
            ahead = lead < -Z * volume ** 0.5
        elif op == "adm" and not (held and ruling):
            traffic += a
            if traffic >= WINDOW:
                traffic = 0
                lead /= 2
                volume /= 2
                ahead = lead < -Z * volume ** 0.5
        out.append((lead, volume, ahead))
    return out


def play(witness: LruWitness, script: list[tuple[str, int, int]]) -> list[
        tuple[float, float, bool]]:
    out = []
    for op, a, b in script:
        if op == "rel":
            witness.released(0, a, b)
        elif op == "lost":
            witness.recalled(a, b)
        else:
            witness.admitted(a, [], ROOM)
        out.append((witness.lead, witness.volume, witness.lru_ahead))
    return out


def test_the_plain_witness_fades_back_and_the_held_one_stays() -> None:
    """Two runs lost (-5 against sqrt(13) = 3.6): LRU's order. The plain witness halves
    its books after 8 prompt blocks (-2.5 against 2.55: within chance, the learned order
    again, and so on at every loss and fade); the held one counts no prompt block
    admitted in LRU's order, so its lead stands and every later loss only adds to it."""
    plain = play(LruWitness(CAPACITY, WINDOW), SCRIPT)
    held_witness = HeldWitness(CAPACITY, WINDOW)
    held = play(held_witness, SCRIPT)
    assert plain == reference(SCRIPT, held=False)
    assert held == reference(SCRIPT, held=True)
    assert [v for _, _, v in plain] == [False] * 6 + [True, True, False, True, False,
                                                     False, True, False]
    assert [v for _, _, v in held] == [False] * 6 + [True] * 8
    assert held[-1][:2] == (-8.0, 18.0)
    assert held_witness.num_held_blocks == 4 + 4 + 8 + 8 + 8


def test_held_fades_again_while_another_rule_ranks() -> None:
    """With the learned order ranking whatever the verdict (a veto rules), the held
    witness fades as the plain one."""
    witness = HeldWitness(CAPACITY, WINDOW, ruling_lru=lambda: False)
    assert play(witness, SCRIPT) == reference(SCRIPT, held=True, lru_rules=False)
    assert play(HeldWitness(CAPACITY, WINDOW, ruling_lru=lambda: False), SCRIPT) == play(
        LruWitness(CAPACITY, WINDOW), SCRIPT)
    assert witness.num_held_blocks == 0


def test_sealed_counts_nothing_in_lrus_order() -> None:
    """Sealed: after the switch the later losses count nothing (the lead stays -5) and
    nothing fades: LRU's tenure has no exit of its own."""
    got = play(SealedWitness(CAPACITY, WINDOW), SCRIPT)
    assert got == reference(SCRIPT, held=True, sealed=True)
    assert got[-1] == (-5.0, 13.0, True)


def test_the_held_veto_lets_the_witness_fade_while_vetoed() -> None:
    """``HeldVeto`` binds a held witness whose tenure is LRU's only while the veto does
    not overrule it."""
    policy = HeldVeto()
    policy.bind(CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=0))
    witness = policy.witness
    assert isinstance(witness, HeldWitness)
    witness.lru_ahead = True
    assert witness.ruling_lru()
    policy.veto = 1
    assert not witness.ruling_lru()
    tenure = HeldTenure()
    tenure.bind(CacheConfig(tokens_per_block=4, num_gpu_blocks=8, num_host_blocks=0))
    assert isinstance(tenure.witness, HeldWitness) and not tenure.witness.ruling_lru()


def test_the_first_200_agentic_steps() -> None:
    """The default switches to LRU's order at the 97th admission and fades back and forth
    (0.7457). Held, it never leaves it (one switch) and still gains there (0.7590: the
    back-and-forth costs more than the lock). The stratified veto as the exit takes 81
    drops from LRU's order (0.7500)."""
    assert round(run("agentic200", "main")["hit_rate"], 4) == 0.7457
    held = run("agentic200", "hold")
    assert (round(held["hit_rate"], 4), held["switches"]) == (0.7590, 1)
    veto = run("agentic200", "hold-vstrat")
    assert (round(veto["hit_rate"], 4), veto["vetoed_drops"]) == (0.7500, 81)


def test_the_swap_books_end_the_agentic_lock_in() -> None:
    """Held, with the counterfactual books of LRU's drops as the exit (``swap``): in LRU's
    tenure from the 97th admission, 8 of its drops differ from the learned order's choice;
    the learned order leads those books beyond chance at once, and the tenure ends after
    680 prompt blocks (0.7793, the pooled veto's figure)."""
    r = run("agentic200", "swap")
    assert (round(r["hit_rate"], 4), r["swaps"], r["exits"], r["held_blocks"]) == (
        0.7793, 8, 1, 680)


def test_the_miss_witness_fades_with_lrus_own_misses() -> None:
    """In LRU's order the fade counts the blocks of ghosts recalled (LRU's capacity
    misses), not prompt blocks admitted: two runs lost switch it (-5 against 3.6; the
    second's 3 blocks already count), two more (4 + 4) bring the count to 11 past the
    window of 8: lead and volume halve (-6.5 against 4.7, still LRU's), and 100 prompt
    blocks admitted after that fade nothing."""
    script = [("rel", 1, 2), ("rel", 2, 3), ("rel", 3, 4), ("rel", 4, 4),
              ("lost", 1, 2), ("lost", 2, 3), ("lost", 3, 4), ("lost", 4, 4), ("adm", 100, 0)]
    witness = MissWitness(CAPACITY, WINDOW)
    got = play(witness, script)
    assert got[5:] == [(-5.0, 13.0, True), (-9.0, 29.0, True), (-6.5, 22.5, True),
                       (-6.5, 22.5, True)]
    assert witness.num_held_blocks == 100
