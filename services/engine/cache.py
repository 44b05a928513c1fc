"""A KV cache layer that never concatenates.

transformers' ``DynamicLayer`` grows with ``torch.cat`` on every step, copying the
whole layer each time (for SmolLM2 at 576 tokens, ~26 MB per step across the 30
layers). ``PreallocLayer`` writes into a buffer sized for the whole request
(prompt + max_new_tokens; it doubles if ever exceeded) and hands attention a view of
exactly the filled length, so attention sees the same shapes and values as with
``DynamicLayer``: outputs stay token-identical, steps get ~5% cheaper.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class PreallocLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        b, h, t, d = keys.shape
        self._k = keys.new_empty((b, h, max(capacity, t), d))
        self._v = values.new_empty((b, h, max(capacity, t), d))
        self._k[..., :t, :] = keys
        self._v[..., :t, :] = values
        self._len = t
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.keys, self.values = self._k[..., :t, :], self._v[..., :t, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t, n = self._len, key_states.shape[-2]
        if t + n > self._k.shape[-2]:
            cap = max(2 * self._k.shape[-2], t + n)
            k = self._k.new_empty((*self._k.shape[:2], cap, self._k.shape[3]))
            v = self._v.new_empty(k.shape)
            k[..., :t, :] = self._k[..., :t, :]
            v[..., :t, :] = self._v[..., :t, :]
            self._k, self._v = k, v
        self._k[..., t : t + n, :] = key_states
        self._v[..., t : t + n, :] = value_states
        self._len = t + n
        self.keys, self.values = self._k[..., : t + n, :], self._v[..., : t + n, :]
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._len = self.keys.shape[-2]


def preallocated_cache(
    layers: list[tuple[torch.Tensor, torch.Tensor]], config: PretrainedConfig, capacity: int
) -> DynamicCache:
    """A DynamicCache whose layers are ``PreallocLayer``s holding ``layers`` (copied once)."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocLayer(k, v, capacity) for k, v in layers]
    return cache
