"""services.model.tokenizer: the incremental Detokenizer on the tiny byte-level tokenizer."""

from __future__ import annotations

import pytest

from services.model.info import ModelInfo
from services.model.tokenizer import Detokenizer, TextTokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(ModelInfo.load("tiny").path)


def _stream(tok: TextTokenizer, text: str, stop: tuple[str, ...] = (),
            chunk: int = 1) -> tuple[list[str], str, Detokenizer]:
    d = Detokenizer(tok, stop)
    ids = tok.encode(text)
    deltas = [d.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return deltas, d.flush(), d


def test_tiny_tokenizer_is_byte_level(tok: TextTokenizer) -> None:
    assert len(tok.encode("abc")) == 3
    assert len(tok.encode("é")) == 2 and len(tok.encode("✓")) == 3
    assert tok.decode(tok.encode("héllo ✓")) == "héllo ✓"


@pytest.mark.parametrize("text", ["hello world", "a\nb\tc  d", "héllo ✓ wörld 😀 ok"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_deltas_plus_flush_equal_full_decode(tok: TextTokenizer, text: str, chunk: int) -> None:
    deltas, tail, d = _stream(tok, text, chunk=chunk)
    assert "".join(deltas) + tail == tok.decode(tok.encode(text)) == text
    assert not d.stopped
    assert d.flush() == ""  # nothing is emitted twice


def test_without_stop_strings_text_is_not_held_back(tok: TextTokenizer) -> None:
    deltas, tail, _ = _stream(tok, "abc")
    assert deltas == ["a", "b", "c"] and tail == ""


def test_deltas_with_stop_strings_still_reassemble(tok: TextTokenizer) -> None:
    text = "the quick brown fox"
    deltas, tail, d = _stream(tok, text, stop=("XYZ", "never"))
    assert "".join(deltas) + tail == text
    assert not d.stopped
    assert len(tail) <= len("never") - 1  # at most the hold-back window is left for flush


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_stop_string_split_across_tokens(tok: TextTokenizer, chunk: int) -> None:
    deltas, tail, d = _stream(tok, "Answer: 42<END> and more text", stop=("<END>",), chunk=chunk)
    assert d.stopped
    assert "".join(deltas) == "Answer: 42"
    assert tail == ""


def test_nothing_after_a_stop_is_emitted(tok: TextTokenizer) -> None:
    d = Detokenizer(tok, ("STOP",))
    out = [d.add([t]) for t in tok.encode("abcSTOP")]
    assert d.stopped and "".join(out) == "abc"
    assert d.add(tok.encode("more text")) == ""
    assert d.flush() == ""


def test_text_that_starts_like_a_stop_but_diverges_is_emitted(tok: TextTokenizer) -> None:
    deltas, tail, d = _stream(tok, "x <EN then <ENDX fin", stop=("<END>",))
    assert not d.stopped
    assert "".join(deltas) + tail == "x <EN then <ENDX fin"
    # The partial match is released once the text diverges, not only at flush.
    assert "".join(deltas).startswith("x <EN then")


def test_stop_at_the_very_start(tok: TextTokenizer) -> None:
    deltas, tail, d = _stream(tok, "##rest", stop=("##",))
    assert d.stopped and "".join(deltas) == "" and tail == ""


def test_first_of_several_stop_strings_wins_token_by_token(tok: TextTokenizer) -> None:
    deltas, _, d = _stream(tok, "one. two! three", stop=("!", "."))
    assert d.stopped and "".join(deltas) == "one"


def test_earliest_stop_wins_when_tokens_arrive_together(tok: TextTokenizer) -> None:
    d = Detokenizer(tok, ("cd", "bc"))
    assert d.add(tok.encode("abcd")) == "a"
    assert d.stopped


@pytest.mark.parametrize("text", ["é", "café", "✓ done", "a✓b✓c", "😀😀", "naïve ✓ 😀 é"])
@pytest.mark.parametrize("stop", [(), ("zz",), ("✓✓✓",)])
def test_multibyte_characters_are_never_split(
    tok: TextTokenizer, text: str, stop: tuple[str, ...]
) -> None:
    deltas, tail, _ = _stream(tok, text, stop=stop)
    assert all("\ufffd" not in x for x in [*deltas, tail])
    assert "".join(deltas) + tail == text


def test_multibyte_char_held_until_complete(tok: TextTokenizer) -> None:
    d = Detokenizer(tok)
    ids = tok.encode("✓")
    assert [d.add([t]) for t in ids] == ["", "", "✓"]


def test_multibyte_stop_string(tok: TextTokenizer) -> None:
    deltas, tail, d = _stream(tok, "ok ✓ then", stop=("✓",))
    assert d.stopped and "".join(deltas) == "ok " and tail == ""
