"""Next-token choice: greedy at temperature 0, else temperature + top-p sampling.

A seeded request draws from a generator keyed by (seed, position), so the same
seed gives the same tokens whether a token is sampled in prefill or decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def sample(logits: torch.Tensor, params: Sampling, position: int) -> int:
    """``logits``: [vocab] for one position. ``position``: index of the token chosen."""
    import torch

    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed((params.seed * 1_000_003 + position) % (1 << 63))
    return int(torch.multinomial(probs, 1, generator=gen).item())
