"""The mock engine (``--engine mock``, model spec ``mock:<profile>``): a worker that
takes the time a latency model says, for scheduling experiments on 2 cores.

Everything around it is real: gRPC, Redis, the gateway, the kvstore, and KV
buffers of exactly the size the modelled model would produce, which go over the
real transport with header and checksum. No torch is imported.

Latency model (per profile JSON, times in ms):
  prefill(n, cached) = a + b*(n - cached) + c*(n^2 - cached^2)
      the linear term is per new token; the quadratic term is attention of the new
      tokens over the whole context, so a cached prefix of ``cached`` tokens saves both.
  decode step, batch B with contexts ctx_i = d0 + d1*(B - 1) + d2*sum(ctx_i)
      each sequence of a round pays its share, 1/B of the step.
Cached prefixes: chained hashes of 64-token blocks in an LRU (``prefix_cache_blocks``).
Tokens are a deterministic function of the prompt and position, in [16, 256) so that
any byte-level tokenizer can show them; the mock never emits EOS (lengths come from
max_tokens, i.e. from the trace).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.engine.base import OnLayer
from services.engine.paged import BlockAllocator, BlockTable
from services.engine.prefix import chain_hashes
from services.engine.sampling import Sampling
from services.kv.layout import (
    DTYPE_SIZES,
    HEADER_BYTES,
    KvFormatError,
    KvMeta,
    encode_header,
    payload_crc32,
    verify,
)
from services.model.info import ModelInfo
from services.model.profile import profile_path

BLOCK = 64


@dataclass(frozen=True)
class LatencyModel:
    a: float
    b: float
    c: float
    d0: float
    d1: float
    d2: float

    @staticmethod
    def from_profile(p: dict[str, Any]) -> LatencyModel:
        pf, dc = p["prefill_ms"], p["decode_ms"]
        return LatencyModel(pf["a"], pf["b"], pf["c"], dc["d0"], dc["d1"], dc["d2"])

    def prefill_ms(self, n: int, cached: int = 0) -> float:
        cached = min(cached, n)
        return self.a + self.b * (n - cached) + self.c * (n * n - cached * cached)

    def step_ms(self, contexts: list[int]) -> float:
        return self.d0 + self.d1 * (len(contexts) - 1) + self.d2 * sum(contexts)


def block_hashes(ids: list[int]) -> list[bytes]:
    """Chained hashes of the full 64-token blocks (nano-vllm style)."""
    return chain_hashes(ids, BLOCK)


@dataclass
class MockState:
    ids_tail: tuple[int, ...]
    length: int


class MockRunner:
    """Same surface as ``ModelRunner`` (prefill, decode_step, pack, restore, warmup)."""

    def __init__(self, spec: str, cache_dir: str = "", threads: int = 0) -> None:
        path = profile_path(spec.removeprefix("mock:"))
        raw = path.read_bytes()
        self.profile: dict[str, Any] = json.loads(raw)
        self.info = ModelInfo.load(spec, cache_dir)
        self.fingerprint = hashlib.sha256(raw).hexdigest()
        self.config = None
        self.latency = LatencyModel.from_profile(self.profile)
        self.capacity_blocks = int(self.profile.get("prefix_cache_blocks", 4096))
        self.prefix_cache: OrderedDict[bytes, None] = OrderedDict()
        self.prefix_hits_tokens = 0
        self.batch_contexts: list[int] = []  # set by the decode step loop for each round
        self.scale = float(self.profile.get("time_scale", 1.0))
        self.pool: BlockAllocator | None = None

    def _sleep(self, ms: float) -> None:
        if ms > 0:
            time.sleep(ms * self.scale / 1000.0)

    def _token(self, tail: tuple[int, ...], position: int) -> int:
        return 16 + (sum(tail) * 31 + position * 17) % 240

    def attach_prefix_cache(self, capacity_bytes: int, block_tokens: int) -> None:
        """The mock's prefix cache is always on, sized by the profile (block hits only)."""

    def layer_packer(self, num_tokens: int) -> None:
        return None  # no layers to hook: the KV is packed after the modelled compute

    def prefix_metrics(self) -> dict[str, float]:
        return {}

    def attention_model(self) -> None:
        return None

    def prefill(self, ids: list[int], params: Sampling, reuse_prefix: bool = True,
                on_layer: OnLayer | None = None) -> tuple[int, MockState]:
        hashes = block_hashes(ids)
        cached = 0
        for h in hashes if reuse_prefix else ():
            if h not in self.prefix_cache:
                break
            self.prefix_cache.move_to_end(h)
            cached += BLOCK
        for h in hashes:
            self.prefix_cache[h] = None
            self.prefix_cache.move_to_end(h)
        while len(self.prefix_cache) > self.capacity_blocks:
            self.prefix_cache.popitem(last=False)
        self.prefix_hits_tokens += cached
        self._sleep(self.latency.prefill_ms(len(ids), cached))
        state = MockState(tuple(ids[-8:]), len(ids))
        return self._token(state.ids_tail, len(ids)), state

    def decode_step(self, token: int, state: MockState, params: Sampling) -> int:
        contexts = self.batch_contexts or [state.length]
        self._sleep(self.latency.step_ms(contexts) / len(contexts))
        state.length += 1
        return self._token(state.ids_tail, state.length)

    def pack(self, state: MockState, checksum: bool) -> tuple[KvMeta, np.ndarray]:
        i = self.info
        meta = KvMeta(i.kv_dtype, i.num_layers, i.num_kv_heads, i.head_dim, state.length,
                      self.fingerprint)
        buf = np.zeros(meta.total_nbytes, dtype=np.uint8)  # the bytes a real KV would take
        if checksum:
            meta = KvMeta(**{**meta.__dict__, "payload_crc32": payload_crc32(buf[HEADER_BYTES:])})
        buf[:HEADER_BYTES] = np.frombuffer(encode_header(meta), dtype=np.uint8)
        return meta, buf

    def restore(self, buf: memoryview, max_new_tokens: int) -> tuple[KvMeta, MockState]:
        meta = verify(buf, self.fingerprint)
        return meta, MockState((), meta.num_tokens)

    def attach_pool(self, pool_tokens: int, block_tokens: int) -> BlockAllocator:
        """Block accounting only: the mock holds no KV, but admission sees the same limits."""
        i = self.info
        per_block = i.num_layers * 2 * i.num_kv_heads * i.head_dim * block_tokens * \
            DTYPE_SIZES[i.kv_dtype]
        self.pool = BlockAllocator(-(-pool_tokens // block_tokens), block_tokens, per_block)
        return self.pool

    def restore_paged(self, buf: memoryview, table: BlockTable) -> tuple[KvMeta, MockState]:
        meta, state = self.restore(buf, 0)
        if meta.num_tokens > table.capacity:
            raise KvFormatError(f"KV of {meta.num_tokens} tokens exceeds the reserved "
                                f"{table.capacity} slots")
        return meta, state

    def decode_batch(self, tokens: list[int], states: list[MockState],
                     params: list[Sampling]) -> list[int]:
        """One round: the whole batch's step time, once (same model as per-sequence shares)."""
        self._sleep(self.latency.step_ms([s.length for s in states]))
        out = []
        for s in states:
            s.length += 1
            out.append(self._token(s.ids_tail, s.length))
        return out

    def warmup(self) -> None:
        pass
