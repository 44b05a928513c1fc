"""An in-process pdserve cluster for integration tests: every service on port 0,
all in this event loop, registered in the session's real Redis."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from pdserve.v1 import (
    decode_service_pb2,
    decode_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
    prefill_service_pb2,
    prefill_service_pb2_grpc,
)
from services.common.runtime import new_channel
from services.decode import main as decode_main
from services.engine.worker import WorkerConfig
from services.gateway import main as gateway_main
from services.kvstore.main import KvStoreConfig, KvStoreService
from services.prefill import main as prefill_main


@dataclass
class Cluster:
    redis_url: str
    model: str = "tiny"
    prefills: int = 1
    decodes: int = 1
    group: str = field(default_factory=lambda: f"g{uuid.uuid4().hex[:8]}")
    kvstore_overrides: dict[str, Any] = field(default_factory=dict)
    worker_overrides: dict[str, Any] = field(default_factory=dict)
    gateway_overrides: dict[str, Any] = field(default_factory=dict)
    gateways: int = 1
    start_kvstore: bool = True

    async def __aenter__(self) -> Cluster:
        self.channels: list[grpc.aio.Channel] = []
        self.prefill_nodes: list[Any] = []
        self.decode_nodes: list[Any] = []
        self.gateway_nodes: list[Any] = []
        self._kvstore_started = False
        try:
            await self._start()
        except BaseException:  # a start that fails (a refused password) leaves nothing behind
            await self.__aexit__()
            raise
        return self

    async def _start(self) -> None:
        base = dict(redis_url=self.redis_url, group=self.group, heartbeat_s=0.2,
                    registry_ttl_s=3.0, grace_s=0.5)
        self.kvstore = KvStoreService(KvStoreConfig(**base, **self.kvstore_overrides))
        if self.start_kvstore:
            await self.kvstore.start()
            self._kvstore_started = True
        wcfg = WorkerConfig(**base, model=self.model, **self.worker_overrides)
        for i in range(self.prefills):
            self.prefill_nodes.append(
                await prefill_main.start(replace(wcfg, instance_id=f"p{i}-{self.group}")))
        for i in range(self.decodes):
            self.decode_nodes.append(
                await decode_main.start(replace(wcfg, instance_id=f"d{i}-{self.group}")))
        gcfg = gateway_main.GatewayConfig(**base, port=0, model=self.model, registry_poll_s=0.1,
                                          **{"http_port": 0, **self.gateway_overrides})
        for i in range(self.gateways):
            self.gateway_nodes.append(
                await gateway_main.start(replace(gcfg, instance_id=f"gw{i}-{self.group}")))
        self.gateway = self.gateway_nodes[0]
        for _, _, view in self.gateway_nodes:
            await view.refresh()
        self.channels = [new_channel(rt.address) for rt, _, _ in self.gateway_nodes]
        self.stubs = [generation_service_pb2_grpc.GenerationServiceStub(c) for c in self.channels]
        self.channel, self.stub = self.channels[0], self.stubs[0]

    async def __aexit__(self, *exc: object) -> None:
        for ch in self.channels:
            await ch.close()
        for node in self.gateway_nodes:
            await gateway_main.stop(*node)
        for rt, sv in self.decode_nodes:
            await decode_main.stop(rt, sv)
        for rt, sv in self.prefill_nodes:
            await prefill_main.stop(rt, sv)
        if self._kvstore_started:
            await self.kvstore.stop()

    async def generate(
        self, gateway: int = 0, **kw: Any
    ) -> tuple[list[int], str, generation_service_pb2.GenerateResponse]:
        ids: list[int] = []
        text = ""
        last = None
        stub = self.stubs[gateway]
        async for msg in stub.Generate(generation_service_pb2.GenerateRequest(**kw)):
            ids.extend(msg.token_ids)
            text += msg.text
            last = msg
        assert last is not None
        return ids, text, last

    async def kv_stats(self) -> kvstore_service_pb2.GetKvStoreStatsResponse:
        async with grpc.aio.insecure_channel(self.kvstore.runtime.address) as ch:
            stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
            return await stub.GetKvStoreStats(kvstore_service_pb2.GetKvStoreStatsRequest())

    async def decode_stats(self) -> list[decode_service_pb2.GetDecodeStatsResponse]:
        out = []
        for rt, _ in self.decode_nodes:
            async with grpc.aio.insecure_channel(rt.address) as ch:
                stub = decode_service_pb2_grpc.DecodeServiceStub(ch)
                out.append(await stub.GetDecodeStats(decode_service_pb2.GetDecodeStatsRequest()))
        return out

    async def prefill_stats(self) -> list[prefill_service_pb2.GetPrefillStatsResponse]:
        out = []
        for rt, _ in self.prefill_nodes:
            async with grpc.aio.insecure_channel(rt.address) as ch:
                stub = prefill_service_pb2_grpc.PrefillServiceStub(ch)
                out.append(await stub.GetPrefillStats(
                    prefill_service_pb2.GetPrefillStatsRequest()))
        return out
