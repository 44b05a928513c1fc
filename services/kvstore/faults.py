"""Fault injection for the data plane, configured through settings (``PDSERVE_KV_FAULTS``).

A spec is a comma-separated list of ``kind[@transport][#count]``:

  drop_put, drop_get        close the connection after half of the payload moved
  corrupt_header            flip a byte of the KV header before a GET serves it
  corrupt_payload           flip a byte of the KV payload before a GET serves it
  stall_put, stall_get      stop answering mid-transfer (the client's deadline must end it)
  refuse_shm, refuse_rdma   fail the connection before any byte moves (a dead fast path)

``@transport`` limits a fault to one transport (``drop_put@shm``: the tcp retry then
succeeds); ``#count`` fires it that many times (default: every time). The kvstore's data
server applies them; they exist to prove that every failure ends with a clear status, that
fallback happens and is visible, and that no KV bytes leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("drop_put", "drop_get", "corrupt_header", "corrupt_payload", "stall_put",
         "stall_get", "refuse_shm", "refuse_rdma")


@dataclass
class Fault:
    kind: str
    transport: str = ""  # "" = any
    remaining: int = -1  # -1 = unlimited
    fired: int = 0


@dataclass
class Faults:
    faults: list[Fault] = field(default_factory=list)

    @staticmethod
    def parse(spec: str) -> Faults:
        out: list[Fault] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            rest, _, count = part.partition("#")
            kind, _, transport = rest.partition("@")
            if kind not in KINDS or (count and not count.isdigit()):
                raise ValueError(f"bad KV fault {part!r}: use kind[@transport][#count] with "
                                 f"kind in {', '.join(KINDS)}")
            out.append(Fault(kind, transport, int(count) if count else -1))
        return Faults(out)

    def take(self, kind: str, transport: str) -> bool:
        """True (and counted) if ``kind`` should fire now on ``transport``."""
        for f in self.faults:
            if f.kind == kind and f.transport in ("", transport) and f.remaining != 0:
                if f.remaining > 0:
                    f.remaining -= 1
                f.fired += 1
                return True
        return False

    def __bool__(self) -> bool:
        return bool(self.faults)
