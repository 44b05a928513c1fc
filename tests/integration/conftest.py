"""Integration fixtures: a shared in-process cluster (tiny model) per module."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import torch

from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.cluster import Cluster


@pytest.fixture(scope="module", autouse=True)
async def _no_task_outlives_its_module() -> AsyncIterator[None]:
    """Whatever a module starts on the shared event loop it stops, tasks and all. A task
    left behind (a poller that swallowed its cancel, a service whose start failed
    half-way) used to surface only as the session's final cancel-all hanging until the
    timeout, with no word about which task."""
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    give_up = time.monotonic() + 3.0
    while True:
        left = [t for t in asyncio.all_tasks() if t is not me and t not in before]
        if not left or time.monotonic() > give_up:
            break
        await asyncio.sleep(0.05)
    assert not left, "tasks left running: " + "; ".join(
        f"{t.get_name()} {t.get_coro()!r}"[:200] for t in left[:10])


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
