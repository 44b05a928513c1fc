"""Integration fixtures: a shared in-process cluster (tiny model) per module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import torch

from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.cluster import Cluster


@pytest.fixture(scope="module")
async def cluster(redis_url: str) -> AsyncIterator[Cluster]:
    async with Cluster(redis_url, prefills=1, decodes=2) as c:
        yield c


@pytest.fixture(scope="session")
def tiny():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    info = ModelInfo.load("tiny")
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    return info, TextTokenizer(info.path), model


def reference(model, ids: list[int], max_new: int) -> list[int]:  # type: ignore[no-untyped-def]
    """In-process greedy generate: the ground truth for token identity."""
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False)
    return [int(t) for t in out[0, len(ids):]]
