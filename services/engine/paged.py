"""Block accounting for a paged KV pool (pure Python, no torch).

A pool holds ``num_blocks`` fixed-size blocks of ``block_tokens`` token slots. A
request gets a ``BlockTable``: the block ids that hold its tokens, in order, so token
``p`` lives in slot ``blocks[p // block_tokens] * block_tokens + p % block_tokens``.

Decode reserves a request's whole table (prompt + max_new_tokens) *before* its KV
transfer starts, so a transfer never lands in a pool that has no room, and a running
request never needs more blocks (no preemption). The allocator hands out a contiguous
run of blocks when one is free (first fit): then a sequence's slots are one range and
attention reads it as a strided view with no gather. When the pool is fragmented it
falls back to any free blocks, and readers gather.

Lanes (``lane_blocks`` > 0): the pool is also cut into equal lanes, and a table that fits
in one lane is placed at the start of the lowest free lane first. Sequences that start
on a lane boundary sit at a fixed stride from each other, so the decode step reads all
of them as ONE padded batch (a strided view, no copy) in a single attention call; the
others (long prompts, a fragmented pool) are read one by one.

Accounting is exact: every block is either free or owned by exactly one live table;
``free`` is idempotent, and ``owners`` lists who holds what (for leak checks).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


class PoolExhausted(Exception):
    """Not enough free blocks for a reservation; the message says how many."""


@dataclass
class BlockTable:
    owner: str
    blocks: tuple[int, ...]
    block_tokens: int
    freed: bool = field(default=False, compare=False)

    @property
    def capacity(self) -> int:
        """Token slots this table holds."""
        return len(self.blocks) * self.block_tokens

    @property
    def run_start(self) -> int | None:
        """First slot of the table when its blocks are one ascending run, else None."""
        b = self.blocks
        if b and b[-1] - b[0] == len(b) - 1:
            return b[0] * self.block_tokens
        return None

    def slot(self, position: int) -> int:
        if not 0 <= position < self.capacity:
            raise IndexError(f"token {position} is outside the table of {self.capacity} slots")
        return self.blocks[position // self.block_tokens] * self.block_tokens \
            + position % self.block_tokens

    def slots(self, n: int) -> list[int]:
        """Slots of tokens ``0..n-1``."""
        if n > self.capacity:
            raise IndexError(f"{n} tokens do not fit the table of {self.capacity} slots")
        bt = self.block_tokens
        return [self.blocks[p // bt] * bt + p % bt for p in range(n)]


class BlockAllocator:
    """Thread-safe: decode reserves on the event loop and frees on the step thread."""

    def __init__(self, num_blocks: int, block_tokens: int, block_nbytes: int = 0,
                 lane_blocks: int = 0) -> None:
        if num_blocks <= 0 or block_tokens <= 0 or lane_blocks < 0:
            raise ValueError(f"need positive num_blocks and block_tokens and lane_blocks >= 0, "
                             f"got {num_blocks}, {block_tokens}, {lane_blocks}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.lane_blocks = lane_blocks  # 0: no lanes
        self.num_lanes = num_blocks // lane_blocks if lane_blocks else 0
        self.block_nbytes = block_nbytes  # KV bytes one block holds (for stats)
        self._free = [True] * num_blocks
        self._nfree = num_blocks
        self._owners: dict[int, BlockTable] = {}  # id(table) -> table, live tables only
        self._lock = threading.Lock()

    def blocks_for(self, tokens: int) -> int:
        return -(-max(tokens, 1) // self.block_tokens)

    @property
    def free_blocks(self) -> int:
        return self._nfree

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self._nfree

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_nbytes

    def owners(self) -> list[str]:
        with self._lock:
            return [t.owner for t in self._owners.values()]

    def allocate(self, owner: str, tokens: int) -> BlockTable:
        """A table with room for ``tokens``; raises ``PoolExhausted`` when it cannot fit."""
        n = self.blocks_for(tokens)
        with self._lock:
            if n > self._nfree:
                raise PoolExhausted(
                    f"{owner} needs {n} KV blocks ({tokens} tokens), {self._nfree} of "
                    f"{self.num_blocks} are free")
            blocks = self._lane_run(n) or self._first_run(n) or \
                [i for i, f in enumerate(self._free) if f][:n]
            for b in blocks:
                self._free[b] = False
            self._nfree -= n
            table = BlockTable(owner, tuple(blocks), self.block_tokens)
            self._owners[id(table)] = table
            return table

    def free(self, table: BlockTable | None) -> int:
        """Return a table's blocks; a second call (or None) frees nothing. Returns blocks freed."""
        if table is None:
            return 0
        with self._lock:
            if table.freed or id(table) not in self._owners:
                return 0
            table.freed = True
            del self._owners[id(table)]
            for b in table.blocks:
                assert not self._free[b], f"block {b} freed twice"
                self._free[b] = True
            self._nfree += len(table.blocks)
            return len(table.blocks)

    @property
    def lane_tokens(self) -> int:
        return self.lane_blocks * self.block_tokens

    def lane_of(self, table: BlockTable) -> int | None:
        """The lane a table starts at, if it is one run inside one lane."""
        start = table.run_start
        if not self.lane_blocks or start is None or len(table.blocks) > self.lane_blocks:
            return None
        lane, rest = divmod(table.blocks[0], self.lane_blocks)
        return lane if rest == 0 and lane < self.num_lanes else None

    def _lane_run(self, n: int) -> list[int] | None:
        if not 0 < n <= self.lane_blocks:
            return None
        for lane in range(self.num_lanes):
            base = lane * self.lane_blocks
            if all(self._free[base : base + n]):
                return list(range(base, base + n))
        return None

    def _first_run(self, n: int) -> list[int] | None:
        run = 0
        for i, f in enumerate(self._free):
            run = run + 1 if f else 0
            if run == n:
                return list(range(i - n + 1, i + 1))
        return None
