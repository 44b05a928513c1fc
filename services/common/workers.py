"""Pieces the model workers (prefill, decode) share: their config and a
single-thread executor that serialises model calls."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from services.common.config import ModelConfig, ServiceConfig
from services.common.registry import InstanceInfo
from services.common.runtime import ServiceRuntime, host_id
from services.common.transport.config import KvTransferConfig
from services.common.transport.negotiate import client_transports

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerConfig(KvTransferConfig, ServiceConfig, ModelConfig):
    """Settings of a model worker."""

    slots: int = 4  # concurrent requests admitted (b_p for prefill, b_d for decode)
    kv_checksum: bool = True  # crc32 over the KV payload, verified before decoding
    # Emulation for scheduling experiments on small machines: extra prefill time per prompt
    # token, spent on the model thread (so it occupies the slot like real compute). 0 = off.
    emulate_prefill_ms_per_token: float = 0.0
    # Early intervention also ends, before compute, a request whose prefill cannot finish
    # by its TTFT deadline (by a lower bound on this worker's own measured speed).
    predictive_deadline: bool = True


class PrefillEstimator:
    """A lower bound on prefill time, learned from this worker's own prefills.

    ``n * r`` where r is the lowest ms-per-token seen over the last ``window`` prefills:
    fixed costs make short prompts' rates higher and attention makes long ones' higher,
    so the lowest rate is close to the marginal cost per token and never overstates how
    long a prefill takes. A request is only ended early when it surely misses."""

    def __init__(self, window: int = 256) -> None:
        self._rates: deque[float] = deque(maxlen=window)

    def observe(self, tokens: int, ms: float) -> None:
        if tokens > 0 and ms > 0:
            self._rates.append(ms / tokens)

    def lower_bound_ms(self, tokens: int) -> float:
        return tokens * min(self._rates) if self._rates else 0.0

    def upper_ms(self, tokens: int) -> float:
        """``n`` times the slowest rate seen: generous, for sizing leases, never for
        deciding that a request misses."""
        return tokens * max(self._rates) if self._rates else 0.0


def reservation_lease_ms(after_compute_s: float, estimator: PrefillEstimator,
                         tokens: int) -> int:
    """Lease to ask the kvstore for when reserving before the compute: the lease for the
    handoff plus twice the slowest-rate estimate of the compute ahead. A fixed lease made
    long prompts on a busy host (a 4k SmolLM2 prefill took 9-20 s here against a 30 s
    lease) race the sweeper; a dead prefill's reservation still expires."""
    return int(after_compute_s * 1000 + 2 * estimator.upper_ms(tokens))


class ModelThread:
    """Runs model calls one at a time off the event loop."""

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def now_ms() -> float:
    return time.time() * 1000.0


def worker_info(runtime: ServiceRuntime, cfg: WorkerConfig, fingerprint: str) -> InstanceInfo:
    """What a model worker advertises in the registry."""
    return InstanceInfo(
        instance_id=runtime.instance_id, role=runtime.role, group=cfg.group,
        address=runtime.address, slots=cfg.slots, transports=client_transports(cfg),
        model_fingerprint=fingerprint, host_id=host_id(), started_unix=time.time())
