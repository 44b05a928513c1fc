"""services.engine.sampling: greedy, seeded and top-p sampling."""

from __future__ import annotations

import pytest
import torch

from services.engine.sampling import Sampling, sample

pytestmark = pytest.mark.unit

VOCAB = 50


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_is_argmax(temperature: float) -> None:
    for s in range(10):
        logits = _logits(s)
        expect = int(torch.argmax(logits))
        for pos in range(3):
            got = sample(logits, Sampling(temperature=temperature, seed=s), pos)
            assert got == expect


def test_greedy_ignores_top_p_and_seed() -> None:
    logits = torch.zeros(VOCAB)
    logits[17] = 1.0
    assert sample(logits, Sampling(0.0, top_p=0.01, seed=None), 0) == 17
    assert sample(logits.to(torch.bfloat16), Sampling(), 9) == 17


def test_seeded_sampling_is_reproducible_per_seed_and_position() -> None:
    logits = torch.zeros(VOCAB)  # uniform: maximal randomness
    params = Sampling(temperature=1.0, seed=1234)
    first = [sample(logits, params, pos) for pos in range(40)]
    torch.manual_seed(999)  # the global RNG must not matter
    torch.rand(10)
    second = [sample(logits, params, pos) for pos in range(40)]
    assert first == second
    # Position order does not matter either: it is a pure function of (seed, position).
    assert [sample(logits, params, pos) for pos in reversed(range(40))] == first[::-1]


def test_seeded_sampling_varies_across_positions_and_seeds() -> None:
    logits = torch.zeros(VOCAB)
    a = [sample(logits, Sampling(temperature=1.0, seed=7), pos) for pos in range(40)]
    b = [sample(logits, Sampling(temperature=1.0, seed=8), pos) for pos in range(40)]
    assert len(set(a)) > 5  # not stuck on one token
    assert a != b


def test_large_and_negative_seeds_work() -> None:
    logits = torch.zeros(VOCAB)
    for seed in (-1, 2**63 - 1, 2**64):
        p = Sampling(temperature=1.0, seed=seed)
        assert sample(logits, p, 3) == sample(logits, p, 3)
        assert 0 <= sample(logits, p, 3) < VOCAB


def test_unseeded_sampling_stays_in_vocab_and_follows_distribution() -> None:
    logits = torch.full((VOCAB,), -1e9)
    logits[[3, 11]] = 0.0
    picks = {sample(logits, Sampling(temperature=1.0), pos) for pos in range(60)}
    assert picks == {3, 11}


def test_tiny_top_p_keeps_only_the_top_token() -> None:
    for s in range(5):
        logits = _logits(s)
        top = int(torch.argmax(logits))
        params = Sampling(temperature=5.0, top_p=1e-6, seed=s)
        assert {sample(logits, params, pos) for pos in range(30)} == {top}


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params_top2 = [Sampling(temperature=1.0, top_p=0.7, seed=s) for s in range(30)]
    picks = {sample(logits, p, pos) for p in params_top2 for pos in range(5)}
    assert picks == {0, 1}  # 0.5 < 0.7 so token 1 is kept; 0.8 >= 0.7 so token 2 is not


def test_high_temperature_flattens_low_sharpens() -> None:
    logits = torch.tensor([2.0, 0.0, 0.0, 0.0])
    cold = [sample(logits, Sampling(temperature=0.05, seed=s), 0) for s in range(50)]
    hot = [sample(logits, Sampling(temperature=100.0, seed=s), 0) for s in range(50)]
    assert set(cold) == {0}
    assert len(set(hot)) >= 3
