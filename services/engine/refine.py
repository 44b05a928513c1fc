"""Prompt refinement for P/D-Device: keep rho*|P| prompt tokens, chosen from the data the
cloud's prefill already computed (docs/pd-device.md, "Prompt refinement").

Importance of prompt token i = the attention it receives from the last ``window``
prompt positions (the "observation window", as in SnapKV), averaged over the heads of
the last ``layers`` layers. The probe needs no eager attention and no second forward
pass: a pre-hook on each of those attention modules keeps the window's hidden states
and rotary embeddings during the normal (sdpa) prefill; afterwards the window's
queries are projected once (``window`` rows) and dotted with the keys the prefill left
in the KV cache. Cost: O(layers * heads * window * |P|), a few ms.

Selection (``select``): the first ``head`` tokens (system/instruction and the chat
template's opening), the last ``tail`` tokens (the question's end and the assistant
header the answer follows), then the most important of the rest, until rho*|P|;
original order is kept. ``select`` is pure and unit-tested without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from services.engine.base import Runner

T = TypeVar("T")


@dataclass(frozen=True)
class RefineConfig:
    window: int = 16  # observation window: the last prompt positions whose attention counts
    layers: int = 2  # the last this-many layers are probed
    head: int = 8  # prompt tokens always kept at the start
    tail: int = 32  # prompt tokens always kept at the end


def refined_len(n: int, ratio: float) -> int:
    return max(1, min(n, math.ceil(ratio * n)))


def select(importance: Sequence[float], ratio: float, cfg: RefineConfig = RefineConfig()
           ) -> list[int]:
    """Indices (ascending) of the ceil(ratio*n) prompt tokens to keep."""
    n = len(importance)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"refine ratio must be in (0, 1], got {ratio}")
    keep_n = refined_len(n, ratio)
    if keep_n >= n:
        return list(range(n))
    # The tail first (the answer continues from it), then the head, then by importance.
    forced = list(range(n - 1, max(-1, n - 1 - cfg.tail), -1)) + list(range(min(cfg.head, n)))
    chosen: dict[int, None] = {}
    for i in forced:
        if len(chosen) >= keep_n:
            break
        chosen.setdefault(i, None)
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-importance[i], i))
    for i in rest[:keep_n - len(chosen)]:
        chosen[i] = None
    return sorted(chosen)


def refine(ids: Sequence[int], importance: Sequence[float] | None, ratio: float,
           cfg: RefineConfig = RefineConfig()) -> list[int]:
    """P' for prompt ``ids``. Without importance (an engine that has none) every middle
    token counts the same, so the kept middle tokens are the earliest ones."""
    scores = list(importance) if importance is not None else [0.0] * len(ids)
    return [ids[i] for i in select(scores, ratio, cfg)]


class ImportanceProbe:
    """Captures the observation window during one prefill, then scores the prompt."""

    def __init__(self, model: Any, cfg: RefineConfig = RefineConfig()) -> None:
        self.cfg = cfg
        layers = model.model.layers
        self._attn = [(len(layers) - 1 - j, layers[len(layers) - 1 - j].self_attn)
                      for j in range(min(cfg.layers, len(layers)))]
        self._captured: dict[int, tuple[Any, Any, Any]] = {}

    def wrap(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn`` (a prefill on the model thread) with the hooks installed around it."""
        def run(*args: Any) -> T:
            handles = [attn.register_forward_pre_hook(self._hook(idx), with_kwargs=True)
                       for idx, attn in self._attn]
            try:
                return fn(*args)
            finally:
                for h in handles:
                    h.remove()
        return run

    def _hook(self, idx: int) -> Callable[..., None]:
        w = self.cfg.window

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = kwargs.get("hidden_states", args[0] if args else None)
            assert h is not None, "a decoder layer is called with its hidden states"
            cos, sin = kwargs["position_embeddings"]
            if idx not in self._captured:  # the prompt's forward, not a later decode step
                self._captured[idx] = (h[:, -w:].detach().clone(), cos[:, -w:].clone(),
                                       sin[:, -w:].clone())
        return hook

    def scores(self, cache: Any) -> list[float] | None:
        """Per-prompt-token importance from the captured window and the cache's keys."""
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if not self._captured:
            return None
        total: torch.Tensor | None = None
        with torch.inference_mode():
            for idx, attn in self._attn:
                h, cos, sin = self._captured[idx]
                keys = cache.layers[idx].keys  # [1, kv_heads, n, d], rotary applied
                n, d = keys.shape[-2], attn.head_dim
                q = attn.q_proj(h).view(1, h.shape[1], -1, d).transpose(1, 2)
                if hasattr(attn, "q_norm"):
                    q = attn.q_norm(q)
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)
                k = keys[..., :n, :].repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
                logits = torch.matmul(q.float(), k.float().transpose(2, 3)) * d ** -0.5
                w = q.shape[2]
                pos_q = torch.arange(n - w, n).view(w, 1)
                logits = logits.masked_fill(torch.arange(n).view(1, n) > pos_q, float("-inf"))
                probs = torch.softmax(logits, dim=-1).mean(dim=(0, 1, 2))  # [n]
                total = probs if total is None else total + probs
        assert total is not None
        return [float(x) for x in total / len(self._attn)]


def probe_for(runner: Runner, ratio: float) -> ImportanceProbe | None:
    """A probe for a request that asks for refinement, when the engine has a torch model
    with the layout the probe reads (Llama-family attention); None otherwise."""
    if not 0.0 < ratio < 1.0:
        return None
    model = runner.attention_model()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[-1], "self_attn") or \
            not hasattr(layers[-1].self_attn, "q_proj"):
        return None
    return ImportanceProbe(model)


def refined_prompt(probe: ImportanceProbe | None, cache: Any, ids: list[int], ratio: float
                   ) -> tuple[list[int], str, float]:
    """(P', method, ms) for the prefill: "attention" from the probe, or "uniform" when the
    engine has no attention to read (the mock engine)."""
    import time

    t0 = time.monotonic()
    scores = probe.scores(cache) if probe is not None else None
    kept = refine(ids, scores, min(ratio, 1.0))
    return kept, "attention" if scores else "uniform", (time.monotonic() - t0) * 1e3
