"""Continuous batching over the paged KV pool (tiny model): RecvScatter, mixed-batch
token identity against in-process ``generate``, join/leave mid-stream through the step
loop, per-request sampling, and zero leaked blocks after cancels and errors."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.decode.steploop import DecodeSequence, StepLoop
from services.engine import attend
from services.engine.paged import BlockTable
from services.engine.pool import KvPool
from services.engine.runner import ModelRunner
from services.engine.sampling import Sampling
from services.kv.layout import KvFormatError
from tests.integration.conftest import reference

pytestmark = pytest.mark.unit
BLOCK = 4  # small blocks: tables span many blocks and fragment easily


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    r = ModelRunner("tiny", threads=1)  # tiny: one thread is faster on shared cores
    r.attach_pool(2048, BLOCK)
    return r


@pytest.fixture(scope="module")
def plain_model():  # type: ignore[no-untyped-def]
    """A separate copy with stock attention: the ground truth never runs our code."""
    from services.model.info import ModelInfo

    path = ModelInfo.load("tiny").path
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(params=["kernel", "sdpa"])
def attention(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Both read paths of the step: the compiled kernel (engine.attend), and SDPA (lanes
    and one by one), which serves when the kernel cannot compile."""
    assert attend.available()
    if request.param == "sdpa":
        monkeypatch.setattr(attend, "_kernel", None)
    return str(request.param)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [3, 17, 64, 5, 40, 9, 100, 33][:n]
    return [[rng.randrange(3, 250) for _ in range(k)] for k in lengths]


def _fragment(pool: KvPool) -> list[BlockTable]:
    """Leave every other block used, so the next tables cannot be one run."""
    held = [pool.allocate(f"hole{i}", BLOCK) for i in range(pool.free_blocks)]
    keep = held[::2]
    for t in held[1::2]:
        pool.free(t)
    return keep


GREEDY = Sampling()


def _admit(runner: ModelRunner, ids: list[int], max_new: int,  # type: ignore[no-untyped-def]
           params: Sampling = GREEDY):
    first, cache = runner.prefill(ids, params)
    _, buf = runner.pack(cache, True)
    assert runner.pool is not None
    table = runner.pool.allocate(f"r{len(ids)}", len(ids) + max_new + 1)
    meta, seq = runner.restore_paged(memoryview(buf), table)
    assert meta.num_tokens == len(ids) == seq.length
    return first, seq, buf


def test_recv_scatter_round_trips_contiguous_and_fragmented(runner: ModelRunner) -> None:
    pool = runner.pool
    assert pool is not None
    ids = list(range(10, 47))
    _, cache = runner.prefill(ids, Sampling())
    _, buf = runner.pack(cache, True)
    holes = _fragment(pool)
    try:
        for frag in (True, False):
            if not frag:
                for t in holes:
                    pool.free(t)
            table = pool.allocate("t", len(ids))
            assert (table.run_start is None) == frag
            pool.scatter(memoryview(buf), table, runner.fingerprint)
            for i, layer in enumerate(cache.layers):
                k, v = pool.gather(table, i, len(ids))
                assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)
            pool.free(table)
    finally:
        for t in holes:
            pool.free(t)
    assert pool.used_blocks == 0


def test_recv_scatter_refuses_what_does_not_fit(runner: ModelRunner) -> None:
    pool = runner.pool
    assert pool is not None
    _, cache = runner.prefill(list(range(10, 30)), Sampling())
    _, buf = runner.pack(cache, True)
    small = pool.allocate("small", 8)
    with pytest.raises(KvFormatError, match="exceeds the reserved"):
        pool.scatter(memoryview(buf), small, runner.fingerprint)
    with pytest.raises(KvFormatError, match="same model"):
        pool.scatter(memoryview(buf), small, "f" * 64)
    pool.free(small)
    assert pool.used_blocks == 0


@pytest.mark.parametrize("fragmented", [False, True])
def test_mixed_batch_is_token_identical_to_generate(
    runner: ModelRunner, plain_model, fragmented: bool, attention: str  # type: ignore[no-untyped-def]
) -> None:
    assert runner.pool is not None
    max_new = 16
    prompts = _prompts(8)
    want = [reference(plain_model, p, max_new) for p in prompts]
    holes = _fragment(runner.pool) if fragmented else []
    firsts, seqs = [], []
    for p in prompts:
        first, seq, _ = _admit(runner, p, max_new)
        firsts.append(first)
        seqs.append(seq)
    if fragmented:
        assert all(s.table.run_start is None for s in seqs)
    else:  # every table fits a lane: the step reads them as one padded batch
        assert all(runner.pool.lane_of(s.table) is not None for s in seqs)
    outs = [[f] for f in firsts]
    for _ in range(max_new - 1):
        toks = runner.decode_batch([o[-1] for o in outs], seqs, [Sampling()] * len(seqs))
        for o, t in zip(outs, toks, strict=True):
            o.append(t)
    for s in seqs:
        runner.pool.free(s.table)
    for t in holes:
        runner.pool.free(t)
    assert outs == want
    assert runner.pool.used_blocks == 0


def test_lane_batch_and_one_by_one_reads_in_one_step_are_token_identical(
    runner: ModelRunner, plain_model, attention: str  # type: ignore[no-untyped-def]
) -> None:
    """Lane-aligned sequences (one padded attention call) and a long one that spans lanes
    (read on its own) share steps; sequences leave at different steps, so the lane rows
    get holes; all stay identical to generate."""
    pool = runner.pool
    assert pool is not None
    rng = random.Random(5)
    prompts = [*_prompts(4, seed=5), [rng.randrange(3, 250) for _ in range(150)]]
    lengths = [12, 3, 12, 7, 12]
    want = [reference(plain_model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    admitted = [_admit(runner, p, n) for p, n in zip(prompts, lengths, strict=True)]
    seqs = [s for _, s, _ in admitted]
    assert [pool.lane_of(s.table) is not None for s in seqs] == [True] * 4 + [False]
    outs = [[f] for f, _, _ in admitted]
    live = list(range(len(seqs)))
    while live:
        toks = runner.decode_batch([outs[i][-1] for i in live], [seqs[i] for i in live],
                                   [GREEDY] * len(live))
        for i, t in zip(live, toks, strict=True):
            outs[i].append(t)
        live = [i for i in live if len(outs[i]) < lengths[i]]
    for s in seqs:
        pool.free(s.table)
    assert outs == want
    assert pool.used_blocks == 0


def test_sampled_neighbours_do_not_change_greedy_and_seeds_repeat(runner: ModelRunner) -> None:
    """Per-request sampling: a seeded request draws the same tokens alone or in a batch,
    and a greedy request's tokens do not depend on who shares its step."""
    assert runner.pool is not None
    hot = Sampling(temperature=0.9, top_p=0.8, seed=7)
    ids_a, ids_b = list(range(20, 50)), list(range(60, 71))

    def run(batch: list[tuple[list[int], Sampling]]) -> list[list[int]]:
        admitted = [_admit(runner, ids, 12, p) for ids, p in batch]
        outs = [[f] for f, _, _ in admitted]
        seqs = [s for _, s, _ in admitted]
        for _ in range(11):
            toks = runner.decode_batch([o[-1] for o in outs], seqs, [p for _, p in batch])
            for o, t in zip(outs, toks, strict=True):
                o.append(t)
        for s in seqs:
            runner.pool.free(s.table)  # type: ignore[union-attr]
        return outs

    alone_a, alone_b = run([(ids_a, hot)])[0], run([(ids_b, Sampling())])[0]
    together = run([(ids_a, hot), (ids_b, Sampling())])
    assert together == [alone_a, alone_b]
    assert runner.pool.used_blocks == 0


async def test_join_and_leave_mid_stream(runner: ModelRunner, plain_model) -> None:  # type: ignore[no-untyped-def]
    """Requests join a running batch and leave it at different steps; every one stays
    identical to generate, and all blocks come back."""
    pool = runner.pool
    assert pool is not None
    steps = StepLoop()
    steps.runner, steps.pool = runner, pool
    loop = asyncio.get_running_loop()
    prompts = _prompts(6, seed=3)
    lengths = [20, 4, 11, 16, 2, 9]
    want = [reference(plain_model, p, n) for p, n in zip(prompts, lengths, strict=True)]

    async def one(i: int, delay_tokens: asyncio.Event | None) -> list[int]:
        if delay_tokens is not None:
            await delay_tokens.wait()
        first, state, _ = await steps.run(_admit, runner, prompts[i], lengths[i])
        seq = DecodeSequence(f"r{i}", state, state.table, first, Sampling(), lengths[i] - 1,
                             frozenset(), loop)
        out = [first]
        steps.submit(seq)
        while len(out) < lengths[i]:
            item = await seq.queue.get()
            assert not isinstance(item, BaseException)
            out.append(item[0])
            if len(out) == 3 and i == 0:
                late.set()  # later requests join once the first is mid-stream
        return out

    late = asyncio.Event()
    try:
        got = await asyncio.gather(one(0, None), one(1, None),
                                   *(one(i, late) for i in range(2, 6)))
    finally:
        steps.stop()
    assert got == want
    assert steps.max_batch >= 2
    assert pool.used_blocks == 0


async def test_cancel_and_step_error_free_every_block(runner: ModelRunner) -> None:
    pool = runner.pool
    assert pool is not None
    steps = StepLoop()
    steps.runner, steps.pool = runner, pool
    loop = asyncio.get_running_loop()
    try:
        first, state, _ = await steps.run(_admit, runner, list(range(10, 30)), 50)
        keep = DecodeSequence("keep", state, state.table, first, Sampling(), 50, frozenset(), loop)
        steps.submit(keep)
        await keep.queue.get()
        steps.cancel(keep)
        for _ in range(2):  # the 2nd job runs in the iteration after the drop of cancelled
            await steps.run(lambda: None)
        assert pool.used_blocks == 0
        # A step that raises fails every request in it and still frees their blocks.
        seqs = []
        for n in (5, 9):
            first, state, _ = await steps.run(_admit, runner, list(range(10, 10 + n)), 50)
            state.length = state.table.capacity  # no slot left: the forward raises
            seqs.append(DecodeSequence(f"e{n}", state, state.table, first, Sampling(), 50,
                                       frozenset(), loop))
        for s in seqs:
            steps.submit(s)
        for s in seqs:
            item = await s.queue.get()
            assert isinstance(item, IndexError)
    finally:
        steps.stop()
    assert pool.used_blocks == 0 and pool.owners() == []
