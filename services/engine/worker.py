"""What every model worker (prefill, decode, device) shares: its config, the single-thread
executor that serialises model calls, and what it advertises in the registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from services.cluster.registry import InstanceInfo
from services.common.config import ModelConfig, ServiceConfig
from services.common.runtime import ServiceRuntime, host_id
from services.kv.config import KvTransferConfig
from services.kv.negotiate import client_transports

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
