"""services.kvstore.store: the KV lifecycle, capacity, leases and handle secrecy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.kv.base import Status, TransferError
from services.kvstore.store import KvStore, State

pytestmark = pytest.mark.unit

CAP = 1000
LEASE = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = [100.0]

    def __call__(self) -> float:
        return self.now[0]

    def advance(self, dt: float) -> None:
        self.now[0] += dt


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def store(clock: Clock) -> Iterator[KvStore]:
    s = KvStore(capacity_bytes=CAP, default_lease_s=LEASE, clock=clock)
    yield s
    _check_invariants(s)


def _check_invariants(s: KvStore) -> None:
    assert s.bytes_held == sum(e.nbytes for e in s.entries.values())
    assert 0 <= s.bytes_held <= s.capacity_bytes
    for e in s.entries.values():
        assert e.state in (State.RESERVED, State.TRANSFERRING, State.READY)


def _put(s: KvStore, rid: str, data: bytes) -> str:
    e = s.reserve(rid, len(data))
    view = s.begin_put(e.handle, rid, len(data))
    view[:] = data
    s.end_put(e.handle, ok=True)
    return e.handle


def test_full_lifecycle_frees_on_successful_get(store: KvStore) -> None:
    data = bytes(range(200))
    e = store.reserve("r1", len(data))
    assert e.state is State.RESERVED and store.bytes_held == 200
    view = store.begin_put(e.handle, "r1", 200)
    assert len(view) == 200 and e.state is State.TRANSFERRING
    view[:] = data
    store.end_put(e.handle, ok=True)
    assert e.state is State.READY and store.counters.bytes_in_total == 200

    out = store.begin_get(e.handle, "r1")
    assert bytes(out) == data and e.fetching
    store.end_get(e.handle, ok=True)

    assert e.state is State.CONSUMED and e.buffer is None
    assert store.bytes_held == 0 and not store.entries
    assert store.counters.consumed_total == 1
    assert store.counters.reserved_total == 1
    assert store.counters.bytes_out_total == 200
    assert store.counters.aborted_total == store.counters.expired_total == 0


def test_reserve_sets_lease_from_clock(store: KvStore, clock: Clock) -> None:
    assert store.reserve("r", 1).lease_expires == clock() + LEASE
    assert store.reserve("r", 1, lease_s=2.0).lease_expires == clock() + 2.0


def test_capacity_cap_rejects_and_counts(store: KvStore) -> None:
    store.reserve("a", 600)
    store.reserve("b", 400)  # exactly at capacity is fine
    assert store.bytes_held == CAP
    with pytest.raises(ResourceExhausted) as ei:
        store.reserve("c", 1)
    err = ei.value
    assert err.reason == "KV_CAPACITY"
    assert err.metadata == {"request_id": "c"}
    assert store.counters.rejected_total == 1
    assert store.counters.reserved_total == 2
    assert store.bytes_held == CAP and len(store.entries) == 2


def test_capacity_comes_back_after_release(store: KvStore) -> None:
    e = store.reserve("a", CAP)
    with pytest.raises(ResourceExhausted):
        store.reserve("b", 1)
    assert store.release(e.handle, "a") is State.RESERVED
    assert store.reserve("b", CAP).nbytes == CAP


@pytest.mark.parametrize(("rid", "nbytes"), [("", 10), ("r", 0), ("r", -5)])
def test_reserve_rejects_bad_arguments(store: KvStore, rid: str, nbytes: int) -> None:
    with pytest.raises(InvalidArgument):
        store.reserve(rid, nbytes)
    assert store.counters.reserved_total == 0 and store.bytes_held == 0


def test_wrong_request_id_looks_like_unknown_handle(store: KvStore) -> None:
    h = _put(store, "owner", b"x" * 10)
    with pytest.raises(TransferError) as wrong:
        store.begin_get(h, "intruder")
    with pytest.raises(TransferError) as unknown:
        store.begin_get("0" * 32, "owner")
    assert wrong.value.status == unknown.value.status == Status.NOT_FOUND
    assert str(wrong.value) == str(unknown.value)
    assert store.entries[h].state is State.READY and not store.entries[h].fetching
    with pytest.raises(TransferError) as put_wrong:
        store.begin_put(store.reserve("owner", 5).handle, "intruder", 5)
    assert put_wrong.value.status == Status.NOT_FOUND


def test_put_size_mismatch(store: KvStore) -> None:
    e = store.reserve("r", 100)
    with pytest.raises(TransferError) as ei:
        store.begin_put(e.handle, "r", 99)
    assert ei.value.status == Status.SIZE_MISMATCH
    assert e.state is State.RESERVED and e.buffer is not None and len(e.buffer) == 100
    store.begin_put(e.handle, "r", 100)  # the right size still works
    assert e.state is State.TRANSFERRING


def test_second_put_is_bad_state(store: KvStore) -> None:
    e = store.reserve("r", 8)
    store.begin_put(e.handle, "r", 8)
    with pytest.raises(TransferError) as ei:
        store.begin_put(e.handle, "r", 8)
    assert ei.value.status == Status.BAD_STATE


def test_get_before_ready_is_bad_state(store: KvStore) -> None:
    e = store.reserve("r", 8)
    with pytest.raises(TransferError) as ei:
        store.begin_get(e.handle, "r")
    assert ei.value.status == Status.BAD_STATE
    store.begin_put(e.handle, "r", 8)
    with pytest.raises(TransferError) as ei2:
        store.begin_get(e.handle, "r")
    assert ei2.value.status == Status.BAD_STATE


def test_failed_put_aborts_and_frees(store: KvStore) -> None:
    e = store.reserve("r", 50)
    store.begin_put(e.handle, "r", 50)
    store.end_put(e.handle, ok=False)
    assert e.state is State.ABORTED
    assert store.bytes_held == 0 and store.counters.aborted_total == 1
    assert store.counters.bytes_in_total == 0


def test_failed_put_with_retry_pending_goes_back_to_reserved(store: KvStore) -> None:
    e = store.reserve("r", 50)
    store.begin_put(e.handle, "r", 50)
    store.end_put(e.handle, ok=False, keep=True)  # a shm/rdma push broke; tcp retry comes
    assert e.state is State.RESERVED and store.bytes_held == 50
    view = store.begin_put(e.handle, "r", 50)
    view[:] = b"y" * 50
    store.end_put(e.handle, ok=True)
    assert e.state is State.READY and store.counters.aborted_total == 0


def test_takeover_supersedes_a_stale_push(store: KvStore) -> None:
    e = store.reserve("r", 8)
    store.begin_put(e.handle, "r", 8)
    old = store.generation_of(e.handle)
    store.begin_put(e.handle, "r", 8, takeover=True)  # the retry arrives first
    store.end_put(e.handle, ok=False, generation=old)  # the dead push ends late: ignored
    assert e.state is State.TRANSFERRING
    with pytest.raises(TransferError) as ei:
        store.end_put(e.handle, ok=True, generation=old)
    assert ei.value.status == Status.BAD_STATE
    store.end_put(e.handle, ok=True, generation=store.generation_of(e.handle))
    assert e.state is State.READY


def test_double_get_refused_while_fetching(store: KvStore) -> None:
    h = _put(store, "r", b"abc")
    store.begin_get(h, "r")
    with pytest.raises(TransferError) as ei:
        store.begin_get(h, "r")
    assert ei.value.status == Status.BAD_STATE
    store.end_get(h, ok=True)
    assert store.counters.consumed_total == 1 and store.bytes_held == 0


def test_failed_get_keeps_ready_and_retry_works(store: KvStore) -> None:
    data = b"payload!"
    h = _put(store, "r", data)
    store.begin_get(h, "r")
    store.end_get(h, ok=False)
    e = store.entries[h]
    assert e.state is State.READY and not e.fetching
    assert store.bytes_held == len(data) and store.counters.bytes_out_total == 0
    assert bytes(store.begin_get(h, "r")) == data
    store.end_get(h, ok=True)
    assert store.bytes_held == 0 and store.counters.consumed_total == 1
    assert store.counters.bytes_out_total == len(data)


def test_get_after_consumed_is_not_found(store: KvStore) -> None:
    h = _put(store, "r", b"abc")
    store.begin_get(h, "r")
    store.end_get(h, ok=True)
    with pytest.raises(TransferError) as ei:
        store.begin_get(h, "r")
    assert ei.value.status == Status.NOT_FOUND
    store.end_get(h, ok=True)  # a late hook on a gone entry is harmless
    assert store.counters.consumed_total == 1


def test_release_reserved(store: KvStore) -> None:
    e = store.reserve("r", 30)
    assert store.release(e.handle, "r") is State.RESERVED
    assert store.bytes_held == 0 and e.state is State.ABORTED
    assert store.release(e.handle, "r") is None  # idempotent
    assert store.counters.aborted_total == 1


def test_release_transferring_then_end_put_raises(store: KvStore) -> None:
    e = store.reserve("r", 30)
    store.begin_put(e.handle, "r", 30)
    assert store.release(e.handle, "r") is State.TRANSFERRING
    assert store.bytes_held == 0
    with pytest.raises(TransferError) as ei:
        store.end_put(e.handle, ok=True)
    assert ei.value.status == Status.BAD_STATE
    assert store.release(e.handle, "r") is None
    assert store.counters.bytes_in_total == 0


def test_release_ready(store: KvStore) -> None:
    h = _put(store, "r", b"x" * 40)
    assert store.release(h, "r") is State.READY
    assert store.release(h, "r") is None
    assert store.bytes_held == 0 and store.counters.aborted_total == 1


def test_release_while_fetching_then_end_get_is_noop(store: KvStore) -> None:
    h = _put(store, "r", b"x" * 40)
    view = store.begin_get(h, "r")
    assert store.release(h, "r") is State.READY
    assert bytes(view) == b"x" * 40  # the in-flight view stays valid
    store.end_get(h, ok=True)
    assert store.counters.consumed_total == 0 and store.counters.aborted_total == 1
    assert store.bytes_held == 0


def test_release_with_wrong_request_id_does_nothing(store: KvStore) -> None:
    e = store.reserve("r", 30)
    assert store.release(e.handle, "other") is None
    assert e.handle in store.entries and store.bytes_held == 30
    assert store.release("f" * 32, "r") is None


def test_expire_frees_only_past_deadline(store: KvStore, clock: Clock) -> None:
    old = store.reserve("old", 10, lease_s=5.0)
    new = store.reserve("new", 20, lease_s=50.0)
    clock.advance(4.9)
    assert store.expire() == []
    clock.advance(0.1)  # exactly at the deadline
    gone = store.expire()
    assert [e.handle for e in gone] == [old.handle]
    assert old.state is State.EXPIRED
    assert list(store.entries) == [new.handle]
    assert store.bytes_held == 20 and store.counters.expired_total == 1


def test_expire_all_states_but_not_while_fetching(store: KvStore, clock: Clock) -> None:
    reserved = store.reserve("a", 10)
    transferring = store.reserve("b", 10)
    store.begin_put(transferring.handle, "b", 10)
    ready = _put(store, "c", b"c" * 10)
    fetching = _put(store, "d", b"d" * 10)
    store.begin_get(fetching, "d")
    clock.advance(LEASE + 1)
    gone = {e.handle for e in store.expire()}
    assert gone == {reserved.handle, transferring.handle, ready}
    assert list(store.entries) == [fetching]
    assert store.bytes_held == 10 and store.counters.expired_total == 3
    with pytest.raises(TransferError):
        store.end_put(transferring.handle, ok=True)  # the lease ran out under the push

    store.end_get(fetching, ok=False)  # the fetch failed; now the lease applies
    assert [e.handle for e in store.expire()] == [fetching]
    assert store.bytes_held == 0 and not store.entries


def test_handles_are_128_bit_hex_and_unique(store: KvStore) -> None:
    handles = [store.reserve(f"r{i}", 1).handle for i in range(200)]
    assert all(len(h) == 32 and int(h, 16) >= 0 and h == h.lower() for h in handles)
    assert len(set(handles)) == len(handles)


def test_many_mixed_scenarios_leak_nothing(clock: Clock) -> None:
    s = KvStore(capacity_bytes=10_000, default_lease_s=LEASE, clock=clock)
    for i in range(30):
        rid = f"r{i}"
        e = s.reserve(rid, 100 + i)
        mode = i % 5
        if mode == 0:
            s.release(e.handle, rid)
        elif mode == 1:
            s.begin_put(e.handle, rid, e.nbytes)
            s.end_put(e.handle, ok=False)
        else:
            s.begin_put(e.handle, rid, e.nbytes)
            s.end_put(e.handle, ok=True)
            if mode == 2:
                s.begin_get(e.handle, rid)
                s.end_get(e.handle, ok=True)
        _check_invariants(s)
    c = s.counters
    assert c.reserved_total == 30
    assert c.consumed_total == 6 and c.aborted_total == 12
    clock.advance(LEASE)
    assert len(s.expire()) == 12
    assert s.bytes_held == 0 and not s.entries and s.counters.expired_total == 12


def test_a_kv_larger_than_the_whole_capacity_fails_fast(store: KvStore) -> None:
    with pytest.raises(ResourceExhausted) as exc:
        store.reserve("huge", store.capacity_bytes + 1)
    assert exc.value.reason == "KV_TOO_LARGE"  # final, unlike KV_CAPACITY (wait and retry)
    assert store.bytes_held == 0 and store.counters.rejected_total == 1
