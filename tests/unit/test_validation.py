"""services.gateway.validation against the tiny model's limits and tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from pdserve.v1 import generation_service_pb2 as gen_pb
from services.common.errors import InvalidArgument
from services.gateway.validation import MAX_STOP_STRINGS, ValidRequest, validate
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer

pytestmark = pytest.mark.unit

RID = "req-123"
DEFAULT_MAX = 64


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    return ModelInfo.load("tiny")


@pytest.fixture(scope="module")
def tok(info: ModelInfo) -> TextTokenizer:
    return TextTokenizer(info.path)


def _ok(info: ModelInfo, tok: TextTokenizer, default_max: int = DEFAULT_MAX,
        **kw: Any) -> ValidRequest:
    return validate(gen_pb.GenerateRequest(**kw), RID, info, tok, default_max)


def _bad(info: ModelInfo, tok: TextTokenizer, **kw: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as ei:
        validate(gen_pb.GenerateRequest(**kw), RID, info, tok, DEFAULT_MAX)
    err = ei.value
    assert err.metadata["request_id"] == RID
    assert err.message
    return err


def test_valid_text_request(info: ModelInfo, tok: TextTokenizer) -> None:
    v = _ok(info, tok, prompt="hello", stop=["\n"], scenario="code", ttft_deadline_ms=500)
    assert v.request_id == RID
    assert v.prompt_ids == tok.encode("hello")
    assert v.max_tokens == DEFAULT_MAX
    assert (v.temperature, v.top_p, v.seed) == (0.0, 1.0, None)
    assert v.stop == ("\n",) and v.scenario == "code" and v.ttft_deadline_ms == 500


def test_valid_token_id_request_keeps_sampling_params(info: ModelInfo, tok: TextTokenizer) -> None:
    v = _ok(info, tok, prompt_token_ids=[0, 1, info.vocab_size - 1], max_tokens=5,
            temperature=0.5, top_p=0.9, seed=0)
    assert v.prompt_ids == [0, 1, info.vocab_size - 1]
    assert v.max_tokens == 5
    assert v.temperature == pytest.approx(0.5) and v.top_p == pytest.approx(0.9)
    assert v.seed == 0  # an explicit zero seed is still a seed


def test_model_may_be_empty_name_or_path(info: ModelInfo, tok: TextTokenizer) -> None:
    for model in ("", info.name, str(info.path)):
        assert _ok(info, tok, prompt="x", model=model).prompt_ids == tok.encode("x")


def test_empty_prompt(info: ModelInfo, tok: TextTokenizer) -> None:
    assert _bad(info, tok).reason == "EMPTY_PROMPT"
    assert _bad(info, tok, prompt="", prompt_token_ids=[]).reason == "EMPTY_PROMPT"


def test_both_prompt_and_ids(info: ModelInfo, tok: TextTokenizer) -> None:
    err = _bad(info, tok, prompt="hi", prompt_token_ids=[1, 2])
    assert err.reason == "INVALID_ARGUMENT"
    assert "prompt_token_ids" in err.message


@pytest.mark.parametrize("bad_id", [-1, 10**6])
def test_ids_outside_vocab(info: ModelInfo, tok: TextTokenizer, bad_id: int) -> None:
    err = _bad(info, tok, prompt_token_ids=[1, bad_id, 2])
    assert err.reason == "TOKEN_OUT_OF_VOCAB"
    assert str(bad_id) in err.message


def test_vocab_size_itself_is_out_of_vocab(info: ModelInfo, tok: TextTokenizer) -> None:
    assert _bad(info, tok, prompt_token_ids=[info.vocab_size]).reason == "TOKEN_OUT_OF_VOCAB"


def test_prompt_too_long(info: ModelInfo, tok: TextTokenizer) -> None:
    err = _bad(info, tok, prompt_token_ids=[5] * info.max_context)
    assert err.reason == "PROMPT_TOO_LONG"
    assert str(info.max_context) in err.message


def test_text_prompt_too_long(info: ModelInfo, tok: TextTokenizer) -> None:
    assert _bad(info, tok, prompt="a" * (info.max_context + 5)).reason == "PROMPT_TOO_LONG"


def test_longest_prompt_leaves_room_for_one_token(info: ModelInfo, tok: TextTokenizer) -> None:
    v = _ok(info, tok, prompt_token_ids=[5] * (info.max_context - 1))
    assert v.max_tokens == 1


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_must_be_positive(info: ModelInfo, tok: TextTokenizer, max_tokens: int) -> None:
    err = _bad(info, tok, prompt="hi", max_tokens=max_tokens)
    assert err.reason == "INVALID_ARGUMENT" and "max_tokens" in err.message


def test_max_tokens_past_context(info: ModelInfo, tok: TextTokenizer) -> None:
    ids = [3] * 10
    room = info.max_context - len(ids)
    assert _ok(info, tok, prompt_token_ids=ids, max_tokens=room).max_tokens == room
    err = _bad(info, tok, prompt_token_ids=ids, max_tokens=room + 1)
    assert err.reason == "MAX_TOKENS_TOO_LARGE"
    assert str(room) in err.message


def test_default_max_tokens_is_capped_by_room(info: ModelInfo, tok: TextTokenizer) -> None:
    ids = [3] * (info.max_context - 10)
    assert _ok(info, tok, default_max=64, prompt_token_ids=ids).max_tokens == 10
    assert _ok(info, tok, default_max=7, prompt_token_ids=ids).max_tokens == 7


def test_unknown_model(info: ModelInfo, tok: TextTokenizer) -> None:
    err = _bad(info, tok, prompt="hi", model="gpt-5")
    assert err.reason == "UNKNOWN_MODEL"
    assert "gpt-5" in err.message and info.name in err.message


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), float("inf")])
def test_bad_temperature(info: ModelInfo, tok: TextTokenizer, temperature: float) -> None:
    err = _bad(info, tok, prompt="hi", temperature=temperature)
    assert "temperature" in err.message


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, float("nan")])
def test_bad_top_p(info: ModelInfo, tok: TextTokenizer, top_p: float) -> None:
    err = _bad(info, tok, prompt="hi", top_p=top_p)
    assert "top_p" in err.message


def test_top_p_one_is_fine(info: ModelInfo, tok: TextTokenizer) -> None:
    assert _ok(info, tok, prompt="hi", top_p=1.0).top_p == 1.0


def test_bad_stop_lists(info: ModelInfo, tok: TextTokenizer) -> None:
    assert "stop" in _bad(info, tok, prompt="hi", stop=["ok", ""]).message
    assert "stop" in _bad(info, tok, prompt="hi", stop=["s"] * (MAX_STOP_STRINGS + 1)).message
    assert len(_ok(info, tok, prompt="hi", stop=["s"] * MAX_STOP_STRINGS).stop) == 16


def test_chat_template_with_token_ids(info: ModelInfo, tok: TextTokenizer) -> None:
    err = _bad(info, tok, prompt_token_ids=[1, 2], use_chat_template=True)
    assert "use_chat_template" in err.message


@pytest.fixture(scope="module")
def hf_tok(info: ModelInfo) -> Any:
    from transformers import AutoTokenizer  # heavy import: only for this comparison

    return AutoTokenizer.from_pretrained(info.path)


@pytest.mark.parametrize("text", ["hi", "Write a haiku about caches, please.", "héllo ✓"])
def test_chat_request_matches_transformers(
    info: ModelInfo, tok: TextTokenizer, hf_tok: Any, text: str
) -> None:
    ref = hf_tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if not isinstance(ref, list):
        ref = ref["input_ids"]
    ref = [int(t) for t in ref]
    v = _ok(info, tok, prompt=text, use_chat_template=True)
    assert v.prompt_ids == ref
    assert len(v.prompt_ids) > len(tok.encode(text))  # the template added something
