"""Decode attention over the paged pool: one compiled kernel call per layer for the batch.

A decode step has one query token per sequence, and each sequence's K/V is one run of
slots in the pool (``engine.paged``: the allocator's first choice). The work per layer
is tiny matrix products: per (sequence, KV head), a ``[group, head_dim] x [head_dim, n]``
score product and a ``[group, n] x [n, head_dim]`` value product, with ``group`` the
query heads that share a KV head. torch's CPU flash-attention kernel pays a fixed cost
per such task (blocked GEMM calls with M = 3): for 16 sequences of ~300 tokens and 30
layers (230 MB of K/V a step) it measured 16-30 ms a step here, about 8 GB/s, and it
barely used the second core. ``torch.bmm`` per KV head was slower still.

``decode_attention`` is a numba kernel (compiled once, cached on disk) that runs those
products directly over the pool: one task per (sequence, KV head), spread over the cores
with the same OpenMP runtime torch uses. Each task first writes the step's new K/V into
its slot, then reads exactly that sequence's ``n`` tokens (no padding, no mask), and
does a max-subtracted softmax in float32, as SDPA does. Against SDPA the output differs
only by the order of float additions (max |diff| ~4e-7); greedy tokens are tested
identical to batch-1 ``generate`` (tests/unit/test_batching.py, bench/engine.py).

``available()`` is False when numba cannot load or compile the kernel on this machine;
the pool then reads with SDPA (``engine.pool``'s lane path).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

try:
    import numba
    from numba import prange
except ImportError:  # pragma: no cover - a pinned dependency; SDPA serves without it
    numba = None  # type: ignore[assignment]
    prange = range  # type: ignore[misc]

_kernel: Any = None
_checked = False
_OPTIONS: dict[str, Any] = {
    "parallel": True, "nogil": True, "boundscheck": False,
    # Reassociation lets LLVM vectorize the head_dim dot products. No nnan/ninf: every
    # score is finite and the softmax subtracts the max.
    "fastmath": {"reassoc", "contract"},
}


def _attend_py(q: Any, k_new: Any, v_new: Any, kv: Any, starts: Any, lengths: Any,
               scale: Any, out: Any) -> None:  # pragma: no cover - compiled by numba
    # q, out [B, H, G, D]; k_new, v_new [B, H, D]; kv [2, H, slots, D] (one layer).
    # Sequence b holds slots starts[b] .. starts[b] + lengths[b] - 1, the last one
    # being this step's token.
    nb, nh, ng, nd = q.shape
    for t in prange(nb * nh):
        b = t // nh
        h = t % nh
        s0 = starts[b]
        n = lengths[b]
        last = s0 + n - 1
        for d in range(nd):
            kv[0, h, last, d] = k_new[b, h, d]
            kv[1, h, last, d] = v_new[b, h, d]
        sc = np.empty((ng, n), np.float32)
        for w in range(n):
            for g in range(ng):
                acc = np.float32(0.0)
                for d in range(nd):
                    acc += q[b, h, g, d] * kv[0, h, s0 + w, d]
                sc[g, w] = acc * scale
        for g in range(ng):
            m = sc[g, 0]
            for w in range(1, n):
                m = max(m, sc[g, w])
            tot = np.float32(0.0)
            for w in range(n):
                e = np.exp(sc[g, w] - m)
                sc[g, w] = e
                tot += e
            for d in range(nd):
                out[b, h, g, d] = 0.0
            for w in range(n):
                p = sc[g, w]
                for d in range(nd):
                    out[b, h, g, d] += p * kv[1, h, s0 + w, d]
            inv = np.float32(1.0) / tot
            for d in range(nd):
                out[b, h, g, d] *= inv


def available() -> bool:
    """The kernel loads and compiles here (checked once, on a tiny problem)."""
    global _kernel, _checked
    if not _checked:
        _checked = True
        if numba is None:
            log.warning("numba is not installed: decode attention uses SDPA")
            return False
        try:
            # omp (or tbb): safe when two step threads of one process call the kernel at
            # once (in-process test clusters); numba's workqueue fallback would abort.
            numba.config.THREADING_LAYER = "threadsafe"  # type: ignore[attr-defined]
            try:
                kernel = numba.njit(cache=True, **_OPTIONS)(_attend_py)
            except RuntimeError as e:  # no writable cache location: compile per process
                log.info("decode attention kernel not cached: %s", e)
                kernel = numba.njit(**_OPTIONS)(_attend_py)
            # A zero query weighs both slots equally: the mean of a zero V and a one V.
            q = np.zeros((1, 1, 1, 16), np.float32)
            new = np.ones((1, 1, 16), np.float32)
            kv = np.zeros((2, 1, 4, 16), np.float32)
            out = np.empty_like(q)
            kernel(q, new, new, kv, np.zeros(1, np.int64), np.full(1, 2, np.int64),
                   np.float32(1.0), out)
            if not np.allclose(out, 0.5):
                raise RuntimeError(f"self-check gave {out.ravel()[:4]}")
            _kernel = kernel
        except Exception as e:  # no LLVM target, a failed compile: serve with SDPA
            log.warning("decode attention kernel unavailable, using SDPA: %s", e)
    return _kernel is not None


def disable() -> None:
    """Read with SDPA from now on (A/B benches, and tests of the fallback path)."""
    global _kernel, _checked
    _kernel, _checked = None, True


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     kv_layer: torch.Tensor, starts: np.ndarray, lengths: np.ndarray,
                     scale: float) -> torch.Tensor:
    """Write each sequence's new K/V at its last slot, then attend over its slots.

    ``query`` ``[B, heads, head_dim]``, ``key``/``value`` ``[B, kv_heads, head_dim]``,
    ``kv_layer`` one layer of the pool ``[2, kv_heads, slots, head_dim]`` (contiguous,
    written in place), ``starts``/``lengths`` int64 ``[B]`` (lengths include the new token).
    Returns ``[B, heads, head_dim]``."""
    assert _kernel is not None, "call available() first"
    b, heads, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(b, kv_heads, heads // kv_heads, d).contiguous()
    out = torch.empty_like(q)
    # As many threads as torch's parallel regions (numba's count is per calling thread).
    threads = max(1, min(torch.get_num_threads(), getattr(numba.config, "NUMBA_NUM_THREADS", 1)))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    _kernel(q.numpy(), key.contiguous().numpy(), value.contiguous().numpy(),
            kv_layer.numpy(), starts, lengths, np.float32(scale), out.numpy())
    return out.view(b, heads, d)
