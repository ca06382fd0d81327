"""Red team, sixteenth pass, over the real SmolLM2 checkpoint (extra ``model``): what the
byte-level vocabulary of a real model does to checks written for characters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from kvtier.model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    from kvtier.model.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.mark.parametrize("stop", ["ЖЖЖЖЖЖЖЖЖЖЖЖ", "🦜🦜🦜🦜🦜", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"])
def test_smollm2_finds_a_stop_string_it_writes_in_more_tokens_than_characters(
        tokenizer: Tokenizer, stop: str) -> None:
    """SmolLM2 writes these stops in 24, 15 and 21 tokens, more than their characters + 8:
    StopCheck's window never held one whole, and an answer writing it went on to its
    max_new_tokens. Now it is found as its last token is written."""
    from kvtier.model.generate import StopCheck

    ids = tokenizer.encode("Then she said " + stop)
    assert len(tokenizer.encode(stop)) > len(stop) + 8
    assert StopCheck(tokenizer, (stop,))(ids)


def test_smollm2_decode_names_an_id_the_library_cannot_read(tokenizer: Tokenizer) -> None:
    """The tokenizers library raised OverflowError for -1 and 2**40 ('number too small /
    too large to fit in target type'); now ValueError naming the id and its index."""
    with pytest.raises(ValueError, match=r"^ids: token at index 1 must be an int in "
                                         r"0\.\.2\*\*63-1, got -1 \(int\)$"):
        tokenizer.decode([1, -1])
    with pytest.raises(ValueError, match=r"^ids: token id 1099511627776 at index 0 is past "):
        tokenizer.decode([2**40])
    assert tokenizer.decode(tokenizer.encode("Hello world")) == "Hello world"
