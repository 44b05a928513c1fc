"""Where the kvstore keeps staged KV bytes.

``heap_segment`` is an ordinary numpy buffer. ``memfd_segment`` backs the buffer with an
anonymous memfd (Linux ``memfd_create``) mapped into this process: the ``shm`` transport
hands its file descriptor to a same-host peer over a Unix socket (SCM_RIGHTS), so the
peer writes into (prefill) or maps (decode) the very same pages. A memfd has no name in
/dev/shm: when every process holding it closes it or dies, the kernel frees it, so a
crashed kvstore or peer cannot leave shared memory behind.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np


@dataclass
class Segment:
    """One staged buffer: ``array`` is the bytes; ``fd`` is its memfd or -1."""

    array: np.ndarray
    fd: int = -1

    @property
    def view(self) -> memoryview:
        return memoryview(self.array)

    def close(self) -> None:
        # The mapping itself goes with the last reference to ``array`` (a send in flight
        # may still hold a view); the descriptor can go now. Peers keep their own copies.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def heap_segment(nbytes: int) -> Segment:
    return Segment(np.empty(nbytes, dtype=np.uint8))


def memfd_segment(nbytes: int) -> Segment:
    fd = os.memfd_create("pdserve-kv", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        os.close(fd)
        raise
    return Segment(np.frombuffer(mm, dtype=np.uint8), fd)


def memfd_supported() -> bool:
    """Whether this kernel and Python can make memfds (Linux >= 3.17)."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        memfd_segment(1).close()
    except OSError:
        return False
    return True
