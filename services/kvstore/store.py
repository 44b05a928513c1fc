"""The KV lifecycle: the one owner of every staged KV buffer.

States: RESERVED -> TRANSFERRING -> READY -> (fetching) -> CONSUMED, or ABORTED /
EXPIRED from any live state. A reservation counts against the byte capacity
from the moment it is made, so prefill learns "full" before computing. Release
is idempotent; a lease (TTL) frees whatever a dead prefill, decode or client
left behind. Handles are 128-bit random and only open for their request_id.

A push that breaks on a fast path (shm, rdma) while the client says it will retry on
tcp (``keep=True``) goes back to RESERVED instead of ABORTED; a second push on a
TRANSFERRING entry takes it over (a new generation), so a retry never waits for the
server to notice that the first connection died. Every other broken push aborts.

No I/O here: the clock is injected, and the data channel calls the
``begin_*``/``end_*`` hooks (``services.kvstore.dataserver.DataHandler``).
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, ResourceExhausted
from services.kv.base import Status, TransferError
from services.kv.wire import MAX_REQUEST_ID_BYTES
from services.kvstore.memory import Segment, heap_segment


class State(enum.IntEnum):
    # Values match pdserve.v1.KvState.
    RESERVED = 1
    TRANSFERRING = 2
    READY = 3
    CONSUMED = 4
    ABORTED = 5
    EXPIRED = 6


@dataclass
class Entry:
    handle: str
    request_id: str
    nbytes: int
    lease_expires: float
    state: State = State.RESERVED
    segment: Segment | None = None
    fetching: bool = False
    generation: int = 0  # bumped by every begin_put; a stale end_put is ignored
    owner: str = ""  # the gateway that owns the request (registry instance id)

    @property
    def buffer(self) -> memoryview | None:
        return self.segment.view if self.segment is not None else None


@dataclass
class Counters:
    reserved_total: int = 0
    consumed_total: int = 0
    aborted_total: int = 0
    expired_total: int = 0
    rejected_total: int = 0
    bytes_in_total: int = 0
    bytes_out_total: int = 0


@dataclass
class KvStore:
    capacity_bytes: int
    default_lease_s: float
    clock: Callable[[], float] = time.monotonic
    allocate: Callable[[int], Segment] = heap_segment
    # Called with a segment nobody uses any more (a pool may keep it); default: close it.
    recycle: Callable[[Segment], None] = Segment.close
    entries: dict[str, Entry] = field(default_factory=dict)
    bytes_held: int = 0
    counters: Counters = field(default_factory=Counters)
    max_lease_s: float = 300.0  # a longer lease asked for is cut to this
    max_entry_bytes: int = 0  # one reservation's cap (the model's whole-context KV); 0: none

    def reserve(self, request_id: str, nbytes: int, lease_s: float = 0.0,
                owner: str = "") -> Entry:
        """Room for one request's KV. One live entry per request id: a new reservation
        replaces an older one (its prefill died or gave up before the handoff; the
        gateway's ids are unique, so no two live requests share one)."""
        if not request_id or len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"ReserveKv needs a request_id of 1 to {MAX_REQUEST_ID_BYTES} "
                                  "bytes")
        if nbytes <= 0:
            raise InvalidArgument(f"ReserveKv needs nbytes > 0, got {nbytes}")
        if self.max_entry_bytes and nbytes > self.max_entry_bytes:
            self.counters.rejected_total += 1
            raise InvalidArgument(
                f"a {nbytes}-byte reservation is more than one request of the served model "
                f"can need ({self.max_entry_bytes} bytes: its whole context)",
                reason="KV_RESERVATION_TOO_LARGE", metadata={"request_id": request_id[:128]})
        for old in [e for e in self.entries.values() if e.request_id == request_id]:
            self._drop(old, State.ABORTED)
        if nbytes > self.capacity_bytes:
            self.counters.rejected_total += 1
            raise ResourceExhausted(
                f"a {nbytes}-byte KV can never fit this kvstore's {self.capacity_bytes}-byte "
                "capacity; shorten the prompt or raise PDSERVE_CAPACITY_BYTES",
                reason="KV_TOO_LARGE", metadata={"request_id": request_id})
        if self.bytes_held + nbytes > self.capacity_bytes:
            self.counters.rejected_total += 1
            raise ResourceExhausted(
                f"kvstore is full: {self.bytes_held} of {self.capacity_bytes} bytes held, "
                f"{nbytes} more requested",
                reason="KV_CAPACITY",
                metadata={"request_id": request_id},
            )
        handle = secrets.token_hex(16)
        lease = min(lease_s or self.default_lease_s, self.max_lease_s)
        entry = Entry(handle, request_id, nbytes, self.clock() + lease, owner=owner[:256])
        # The buffer exists from the reservation on (a memfd's pages only once written).
        entry.segment = self.allocate(nbytes)
        self.entries[handle] = entry
        self.bytes_held += nbytes
        self.counters.reserved_total += 1
        return entry

    def _live(self, handle: str, request_id: str) -> Entry:
        entry = self.entries.get(handle)
        # Bytes, not str: compare_digest refuses non-ASCII str (a TypeError per request).
        if entry is None or not secrets.compare_digest(entry.request_id.encode(),
                                                       request_id.encode()):
            # Same answer for "unknown" and "someone else's": no probing for handles.
            raise TransferError("no such KV handle for this request", Status.NOT_FOUND)
        return entry

    def _drop(self, entry: Entry, final: State) -> None:
        if self.entries.pop(entry.handle, None) is None:
            return
        self.bytes_held -= entry.nbytes
        if entry.segment is not None:
            busy = entry.state is State.TRANSFERRING or entry.fetching
            # A transfer still in flight may touch these bytes: never hand them out again.
            if busy:
                entry.segment.close()
            else:
                self.recycle(entry.segment)
            entry.segment = None
        entry.state = final
        if final is State.CONSUMED:
            self.counters.consumed_total += 1
        elif final is State.ABORTED:
            self.counters.aborted_total += 1
        elif final is State.EXPIRED:
            self.counters.expired_total += 1

    # -- data channel hooks -------------------------------------------------------------------
    def begin_put(self, handle: str, request_id: str, nbytes: int,
                  takeover: bool = False) -> memoryview:
        entry = self._live(handle, request_id)
        if entry.state not in (State.RESERVED, State.TRANSFERRING) or (
                entry.state is State.TRANSFERRING and not takeover):
            raise TransferError(f"KV handle is {entry.state.name}, not RESERVED", Status.BAD_STATE)
        if nbytes != entry.nbytes:
            raise TransferError(
                f"push of {nbytes} bytes into a {entry.nbytes}-byte reservation",
                Status.SIZE_MISMATCH,
            )
        entry.state = State.TRANSFERRING
        entry.generation += 1
        if entry.segment is None:
            entry.segment = self.allocate(nbytes)
        return entry.segment.view

    def end_put(self, handle: str, ok: bool, generation: int = 0, keep: bool = False) -> None:
        """``generation`` (0: any) names the push this ends; a superseded one is ignored.
        ``keep``: a failed push returns to RESERVED for a retry instead of aborting."""
        entry = self.entries.get(handle)
        if entry is None:
            raise TransferError("KV handle was released during the transfer", Status.BAD_STATE)
        if generation and generation != entry.generation:
            if ok:
                raise TransferError("KV push was superseded by a retry", Status.BAD_STATE)
            return
        if entry.state is not State.TRANSFERRING:
            raise TransferError(f"KV handle is {entry.state.name}, not TRANSFERRING",
                                Status.BAD_STATE)
        if not ok:
            if keep:
                entry.state = State.RESERVED
            else:
                self._drop(entry, State.ABORTED)
            return
        entry.state = State.READY
        self.counters.bytes_in_total += entry.nbytes

    def begin_get(self, handle: str, request_id: str) -> memoryview:
        entry = self._live(handle, request_id)
        if entry.state is not State.READY or entry.fetching or entry.segment is None:
            raise TransferError(f"KV handle is {entry.state.name}, not READY", Status.BAD_STATE)
        entry.fetching = True
        return entry.segment.view

    def segment_of(self, handle: str) -> Segment | None:
        entry = self.entries.get(handle)
        return entry.segment if entry is not None else None

    def generation_of(self, handle: str) -> int:
        entry = self.entries.get(handle)
        return entry.generation if entry is not None else 0

    def end_get(self, handle: str, ok: bool, lend: bool = False) -> Segment | None:
        """``lend``: a consumer still maps the buffer (shm); a successful fetch then returns
        its segment, which the caller hands back with ``give_back`` once the consumer is
        done with it (the entry is CONSUMED either way)."""
        entry = self.entries.get(handle)
        if entry is None:
            return None
        entry.fetching = False
        lent = None
        if ok:
            self.counters.bytes_out_total += entry.nbytes
            if lend:
                lent, entry.segment = entry.segment, None
            self._drop(entry, State.CONSUMED)
        # On failure the entry stays READY, so the consumer may retry within its lease.
        return lent

    def give_back(self, segment: Segment) -> None:
        """A lent segment the consumer is done with: pooled, or closed if still shared."""
        self.recycle(segment)

    # -- control ------------------------------------------------------------------------------
    def release(self, handle: str, request_id: str) -> State | None:
        """Idempotent: returns the state before release, or None if already gone. An empty
        ``handle`` releases every entry of ``request_id`` (the gateway's internal id: a
        request whose KvRef never reached the gateway), returning the last one's state."""
        if not handle:
            before = None
            for mine in [e for e in self.entries.values() if e.request_id == request_id]:
                before = mine.state
                self._drop(mine, State.ABORTED)
            return before
        entry = self.entries.get(handle)
        if entry is None or entry.request_id != request_id:
            return None
        before = entry.state
        self._drop(entry, State.ABORTED)
        return before

    def owners(self) -> set[str]:
        return {e.owner for e in self.entries.values() if e.owner}

    def release_owned_by(self, owner: str) -> list[Entry]:
        """Free every entry of a gateway that is gone (not one being fetched: that fetch
        ends within its own bound, then the lease takes it)."""
        gone = [e for e in self.entries.values() if e.owner == owner and not e.fetching]
        for e in gone:
            self._drop(e, State.ABORTED)
        return gone

    def expire(self) -> list[Entry]:
        now = self.clock()
        # A fetch in flight finishes (or fails) within its own deadline; expire it after.
        gone = [e for e in self.entries.values() if e.lease_expires <= now and not e.fetching]
        for e in gone:
            self._drop(e, State.EXPIRED)
        return gone
