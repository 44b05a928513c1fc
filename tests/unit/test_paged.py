"""Block accounting of the paged KV pool (pure, no torch)."""

from __future__ import annotations

import threading

import pytest

from services.engine.paged import BlockAllocator, PoolExhausted


def test_allocate_rounds_up_and_free_is_exact() -> None:
    a = BlockAllocator(10, 16)
    t = a.allocate("r1", 33)  # 3 blocks
    assert len(t.blocks) == 3 and t.capacity == 48
    assert (a.used_blocks, a.free_blocks) == (3, 7)
    assert a.owners() == ["r1"]
    assert a.free(t) == 3
    assert (a.used_blocks, a.free_blocks) == (0, 10)
    assert a.free(t) == 0 and a.free(None) == 0  # idempotent
    assert a.owners() == []


def test_contiguous_run_first_then_fragmented_fallback() -> None:
    a = BlockAllocator(6, 4)
    t1, t2, t3 = a.allocate("a", 8), a.allocate("b", 4), a.allocate("c", 8)
    assert t1.blocks == (0, 1) and t2.blocks == (2,) and t3.blocks == (3, 4)
    assert t1.run_start == 0 and t3.run_start == 12
    a.free(t1)
    a.free(t3)  # free: 0, 1, 3, 4, 5 -> a run of 3 exists at 3..5
    t4 = a.allocate("d", 12)
    assert t4.blocks == (3, 4, 5) and t4.run_start == 12
    a.free(t4)
    a.free(t2)
    t5 = a.allocate("e", 4 * 6)  # the whole pool
    assert t5.blocks == tuple(range(6))
    a.free(t5)
    x, y = a.allocate("x", 4), a.allocate("y", 4)
    a.free(x)  # free: 0, 2..5 -> a 5-block table must take the non-contiguous set
    z = a.allocate("z", 20)
    assert z.blocks == (0, 2, 3, 4, 5) and z.run_start is None
    assert z.slot(0) == 0 and z.slot(4) == 8 and z.slot(19) == 23
    assert z.slots(6) == [0, 1, 2, 3, 8, 9]
    a.free(y)
    a.free(z)
    assert a.free_blocks == 6


def test_exhaustion_is_a_clear_error_and_changes_nothing() -> None:
    a = BlockAllocator(4, 16)
    a.allocate("r1", 48)
    with pytest.raises(PoolExhausted, match=r"r2 needs 2 KV blocks .* 1 of 4 are free"):
        a.allocate("r2", 17)
    assert a.used_blocks == 3


def test_slot_outside_the_table_raises() -> None:
    t = BlockAllocator(4, 16).allocate("r", 10)
    with pytest.raises(IndexError):
        t.slot(16)
    with pytest.raises(IndexError):
        t.slots(17)


def test_concurrent_allocate_and_free_keep_exact_accounting() -> None:
    a = BlockAllocator(64, 8)

    def churn(k: int) -> None:
        for i in range(300):
            try:
                t = a.allocate(f"{k}-{i}", 8 * (1 + i % 5))
            except PoolExhausted:
                continue
            a.free(t)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert (a.used_blocks, a.free_blocks, a.owners()) == (0, 64, [])


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        BlockAllocator(0, 16)
    with pytest.raises(ValueError):
        BlockAllocator(4, 0)


def test_lanes_take_the_lowest_free_lane_and_long_tables_fall_back() -> None:
    a = BlockAllocator(20, 4, lane_blocks=5)  # 4 lanes of 5 blocks (20 tokens)
    assert (a.num_lanes, a.lane_tokens) == (4, 20)
    t0, t1 = a.allocate("a", 12), a.allocate("b", 20)  # 3 blocks, 5 blocks
    assert t0.blocks == (0, 1, 2) and t1.blocks == (5, 6, 7, 8, 9)
    assert (a.lane_of(t0), a.lane_of(t1)) == (0, 1)
    a.free(t0)
    t2 = a.allocate("c", 4)  # lane 0 is free again: it is reused first
    assert t2.blocks == (0,) and a.lane_of(t2) == 0
    long = a.allocate("d", 28)  # 7 blocks: more than a lane, first fit run
    assert long.blocks == tuple(range(10, 17)) and a.lane_of(long) is None
    # Lane 3 (15..19) has 15, 16 taken: a 2-block table goes to the first free run (1, 2),
    # which is not on a lane boundary.
    t3 = a.allocate("e", 8)
    assert t3.blocks == (1, 2) and a.lane_of(t3) is None
    for t in (t1, t2, long, t3):
        a.free(t)
    assert a.free_blocks == 20 and a.owners() == []


def test_no_lanes_by_default() -> None:
    a = BlockAllocator(8, 4)
    t = a.allocate("a", 4)
    assert a.num_lanes == 0 and a.lane_of(t) is None
    with pytest.raises(ValueError):
        BlockAllocator(8, 4, lane_blocks=-1)
