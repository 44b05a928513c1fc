"""WAN emulation on the socket path: a TCP relay between the device and the cloud.

The device dials the relay instead of the gateway. Each direction delays every chunk it
reads by the one-way latency (RTT / 2) and serialises the bytes at ``bandwidth_mbps``
(0: unlimited), so gRPC's HTTP/2 frames see a real slow link: the first token, the
refined prompt and the cancel (termination) all pay it. ``tc netem`` would need root
and network namespaces; this needs neither, and it is per device process.
Closing either side closes the other (a cloud that dies closes the device's stream).

Lifecycle: ``start()`` binds 127.0.0.1:0; ``address`` is what the device dials;
``close()`` stops accepting and tears down every relayed connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

CHUNK = 64 << 10


class WanRelay:
    def __init__(self, upstream: str, rtt_ms: float, bandwidth_mbps: float = 0.0) -> None:
        if rtt_ms < 0 or bandwidth_mbps < 0:
            raise ValueError("rtt_ms and bandwidth_mbps must be >= 0")
        host, _, port = upstream.rpartition(":")
        self.upstream = (host or "127.0.0.1", int(port))
        self.one_way_s = rtt_ms / 2e3
        self.bytes_per_s = bandwidth_mbps * 1e6 / 8 if bandwidth_mbps else 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        return self.address

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, dr: asyncio.StreamReader, dw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            dw.close()
            return
        pipes = [asyncio.ensure_future(self._pipe(dr, uw)), asyncio.ensure_future(
            self._pipe(ur, dw))]
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pipes:
                p.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (uw, dw):
                w.close()
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read chunks as they come; deliver each one-way-latency later, at line rate."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            free_at = 0.0  # when the emulated line finishes the previous chunk
            while True:
                due, data = await queue.get()
                if not data:
                    return
                if self.bytes_per_s:
                    free_at = max(free_at, due) + len(data) / self.bytes_per_s
                    due = free_at
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await src.read(CHUNK):
                queue.put_nowait((time.monotonic() + self.one_way_s, data))
            queue.put_nowait((time.monotonic() + self.one_way_s, b""))
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
