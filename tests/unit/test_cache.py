"""PreallocLayer: same tokens as DynamicCache, growth past its capacity."""

from __future__ import annotations

import pytest
import torch

from services.engine.cache import PreallocLayer
from services.engine.kv import cache_from_layers
from services.engine.runner import ModelRunner
from services.engine.sampling import Sampling

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner("tiny")


@pytest.mark.parametrize("capacity", [0, 5, 200])  # 0: plain DynamicCache; 5: must grow
def test_decoding_from_a_preallocated_cache_is_token_identical(
    runner: ModelRunner, capacity: int
) -> None:
    ids = list(range(10, 40))
    first, cache = runner.prefill(ids, Sampling())
    layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    want = [first]
    for _ in range(40):
        want.append(runner.decode_step(want[-1], cache, Sampling()))
    rebuilt = cache_from_layers(layers, runner.config, capacity)
    got = [first]
    for _ in range(40):
        got.append(runner.decode_step(got[-1], rebuilt, Sampling()))
    assert got == want
    assert rebuilt.get_seq_length() == len(ids) + 40


def test_update_returns_exact_length_views_and_keeps_old_values() -> None:
    k = torch.randn(1, 2, 3, 4)
    layer = PreallocLayer(k, k * 2, capacity=4)
    for step in range(5):  # crosses the capacity at step 1
        new = torch.full((1, 2, 1, 4), float(step))
        keys, values = layer.update(new, new * 2)
        assert keys.shape == (1, 2, 4 + step, 4)
        assert torch.equal(keys[..., :3, :], k) and torch.equal(values[..., :3, :], k * 2)
        assert torch.equal(keys[..., -1:, :], new)
    assert layer.get_seq_length() == 8
