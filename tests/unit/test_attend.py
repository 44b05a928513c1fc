"""The decode attention kernel (engine/attend.py) against torch's SDPA on the same K/V,
and that the batched step uses it for every sequence whose table is one run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.engine import attend

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _kernel() -> None:
    assert attend.available(), "numba is a pinned dependency: the kernel must compile"


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 16)])
def test_kernel_matches_sdpa_and_writes_only_the_new_slot(heads: int, kv_heads: int,
                                                          head_dim: int) -> None:
    g = torch.Generator().manual_seed(heads * 100 + head_dim)
    slots = 1024
    pool = torch.randn(2, kv_heads, slots, head_dim, generator=g)
    lengths = [1, 2, 17, 64, 300]  # with this step's token; 1 = the token alone
    starts = [900, 0, 40, 120, 500]
    b = len(lengths)
    q = torch.randn(b, heads, head_dim, generator=g)
    k_new = torch.randn(b, kv_heads, head_dim, generator=g)
    v_new = torch.randn(b, kv_heads, head_dim, generator=g)
    before = pool.clone()
    scale = head_dim ** -0.5
    out = attend.decode_attention(q, k_new, v_new, pool, np.array(starts, np.int64),
                                  np.array(lengths, np.int64), scale)
    assert out.shape == (b, heads, head_dim)
    expect_pool = before.clone()
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        expect_pool[0, :, s + n - 1] = k_new[i]
        expect_pool[1, :, s + n - 1] = v_new[i]
    assert torch.equal(pool, expect_pool)  # the new K/V went in, nothing else moved
    for i, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        k = pool[0, :, s : s + n].unsqueeze(0)
        v = pool[1, :, s : s + n].unsqueeze(0)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[i].view(1, heads, 1, head_dim), k, v, scale=scale, enable_gqa=True)
        torch.testing.assert_close(out[i], want[0, :, 0], atol=2e-6, rtol=1e-5)


def test_decode_batch_reads_runs_with_the_kernel_and_the_rest_one_by_one(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.engine.runner import ModelRunner
    from services.engine.sampling import Sampling

    runner = ModelRunner("tiny", threads=1)
    pool = runner.attach_pool(512, 4)
    calls: list[int] = []
    real = attend.decode_attention

    def counting(query: torch.Tensor, *args):  # type: ignore[no-untyped-def]
        calls.append(query.shape[0])
        return real(query, *args)

    monkeypatch.setattr(attend, "decode_attention", counting)
    seqs, toks = [], []
    for n in (5, 9, 30):
        first, cache = runner.prefill(list(range(10, 10 + n)), Sampling())
        _, buf = runner.pack(cache, False)
        _, seq = runner.restore_paged(memoryview(buf), pool.allocate(f"r{n}", n + 4))
        seqs.append(seq)
        toks.append(first)
    # A fragmented table: read one by one, not by the kernel.
    holes = [pool.allocate(f"h{i}", 4) for i in range(pool.free_blocks)]
    for t in holes[1::2]:
        pool.free(t)
    first, cache = runner.prefill(list(range(40, 47)), Sampling())
    _, buf = runner.pack(cache, False)
    _, frag = runner.restore_paged(memoryview(buf), pool.allocate("frag", 7 + 4))
    assert frag.table.run_start is None and all(s.table.run_start is not None for s in seqs)
    runner.decode_batch([*toks, first], [*seqs, frag], [Sampling()] * 4)
    layers = runner.info.num_layers
    assert calls == [3] * layers  # one call per layer, for the three runs


def test_two_threads_may_call_the_kernel_at_once() -> None:
    """Two decode step threads in one process (in-process test clusters) share the
    kernel: a threadsafe layer, and each call's answer is its own."""
    import threading

    pools = [torch.randn(2, 3, 256, 64) for _ in range(2)]
    qs = [torch.randn(4, 9, 64) for _ in range(2)]
    new = torch.zeros(4, 3, 64)
    starts, lengths = np.array([0, 60, 120, 180], np.int64), np.array([50, 9, 60, 1], np.int64)
    want = [attend.decode_attention(q, new, new, p.clone(), starts, lengths, 0.125)
            for q, p in zip(qs, pools, strict=True)]
    got: list[list[torch.Tensor]] = [[], []]

    def worker(i: int) -> None:
        for _ in range(50):
            got[i].append(attend.decode_attention(qs[i], new, new, pools[i], starts, lengths,
                                                  0.125))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(got[i]) == 50 and all(torch.equal(o, want[i]) for o in got[i])
