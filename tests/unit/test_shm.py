"""Staged-buffer memory: memfd segments and their pool (reuse without page faults, never
reusing pages a consumer has mapped)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from services.kvstore.memory import SegmentPool, memfd_segment, memfd_supported
from services.kvstore.store import KvStore

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not memfd_supported(),
                                                   reason="no memfd_create on this kernel")]
MB = 1 << 20


def test_memfd_segment_is_visible_through_its_fd() -> None:
    seg = memfd_segment(4096)
    seg.array[:5] = np.frombuffer(b"hello", np.uint8)
    peer = mmap.mmap(os.dup(seg.fd), 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    assert peer[:5] == b"hello"
    peer.close()
    seg.close()
    assert seg.fd == -1


def test_pool_reuses_by_size_class_and_bounds_idle_bytes() -> None:
    pool = SegmentPool(max_idle_bytes=4 * MB, granule=2 * MB)
    a = pool.allocate(3 * MB)
    assert len(a.array) == 3 * MB and a.base is not None and len(a.base) == 4 * MB
    pool.recycle(a)
    b = pool.allocate(4 * MB - 1)  # same 4 MiB class: the same pages
    assert b.fd == a.fd and pool.reused == 1 and len(b.array) == 4 * MB - 1
    pool.recycle(b)
    pool.recycle(pool.allocate(1))  # a 2 MiB one: 6 MiB idle > 4 MiB, the oldest goes
    assert pool.idle_bytes <= 4 * MB
    pool.close()
    assert pool.idle_bytes == 0


def test_shared_segment_is_never_reused() -> None:
    pool = SegmentPool()
    seg = pool.allocate(MB)
    fd = seg.fd
    seg.shared = True  # its memfd went to a decode, which maps these pages
    pool.recycle(seg)
    assert seg.fd == -1 and pool.idle_bytes == 0
    assert pool.reused == 0 and fd >= 0


def test_store_recycles_only_finished_segments() -> None:
    pool = SegmentPool()
    store = KvStore(1 << 30, 30.0, allocate=pool.allocate, recycle=pool.recycle)
    e = store.reserve("r", MB)
    store.begin_put(e.handle, "r", MB)
    store.release(e.handle, "r")  # released mid-push: the writer may still be writing
    assert pool.idle_bytes == 0
    e = store.reserve("r2", MB)
    store.begin_put(e.handle, "r2", MB)
    store.end_put(e.handle, ok=True)
    store.begin_get(e.handle, "r2")
    store.end_get(e.handle, ok=True)  # served and done: reusable
    assert pool.idle_bytes == 2 * MB and store.bytes_held == 0
