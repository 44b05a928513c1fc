"""``ModelRunner``: one loaded causal LM, and the two operations the workers need.

- ``prefill``: run the prompt, sample the first token, return it with the KV cache
  (``on_layer`` sees each layer's KV as soon as it is computed: per-layer transfer).
  With ``attach_prefix_cache`` it first reuses the KV of the longest cached prefix
  (``engine.prefix``) and computes only the rest; the returned cache is still whole.
- ``decode_step``: feed one token through a request's cache, sample the next.
- Decode workers instead ``attach_pool`` (a paged KV pool, ``engine.pool``), restore each
  received KV into reserved blocks (``restore_paged``, RecvScatter) and step every active
  request in one forward (``decode_batch``).

Calls are synchronous and meant for one dedicated executor thread per process,
so concurrent requests interleave step by step instead of oversubscribing cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from services.engine import attend
from services.engine.kv import (
    LayerPacker,
    cache_from_layers,
    dtype_name,
    pack_kv,
    unpack_kv,
)
from services.engine.packed import pack_linears
from services.engine.paged import BlockTable
from services.engine.pool import KvPool, PagedSeq, decode_batch, use_paged_attention
from services.engine.prefix import PrefixCache, chain_hashes
from services.engine.sampling import Sampling, sample
from services.kv.layout import KvMeta
from services.model.info import ModelInfo, fingerprint

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, spec: str, cache_dir: str = "", threads: int = 0) -> None:
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)) or 1)
        t0 = time.monotonic()
        self.info = ModelInfo.load(spec, cache_dir)
        self.path: Path = self.info.path
        self.fingerprint = fingerprint(self.path)
        self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32)
        self.model.eval()
        # oneDNN-packed linear layers (engine.packed): measured ~2x faster for both a
        # 512-token prefill and a 16-stream decode step here, greedy tokens unchanged.
        packed = pack_linears(self.model)
        self.config = self.model.config
        self.pool: KvPool | None = None
        self.prefix: PrefixCache | None = None
        log.info("loaded %s (%s) in %.1fs, %d linear layers packed for oneDNN", self.info.name,
                 self.fingerprint[:12], time.monotonic() - t0, packed)

    def attach_prefix_cache(self, capacity_bytes: int, block_tokens: int) -> PrefixCache:
        self.prefix = PrefixCache(capacity_bytes, block_tokens)
        return self.prefix

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], params: Sampling, reuse_prefix: bool = True,
                on_layer: Callable[[int, DynamicCache], None] | None = None,
                ) -> tuple[int, DynamicCache]:
        """``reuse_prefix=False``: compute the whole prompt (still fills the prefix cache),
        for callers that hook the prompt's forward pass (P/D-Device's refine probe).
        ``on_layer(i, cache)`` runs as soon as decoder layer i has finished: its K/V in
        ``cache`` are final (per-layer transfer)."""
        if on_layer is not None:
            with self._layer_hooks(on_layer) as cache:
                return self._prefill(token_ids, params, reuse_prefix, cache)
        return self._prefill(token_ids, params, reuse_prefix, DynamicCache(config=self.config))

    @contextlib.contextmanager
    def _layer_hooks(self, on_layer: Callable[[int, DynamicCache], None],
                     ) -> Iterator[DynamicCache]:
        cache = DynamicCache(config=self.config)
        handles = [layer.register_forward_hook(
            lambda _m, _a, _o, i=i: on_layer(i, cache))
            for i, layer in enumerate(self.model.model.layers)]
        try:
            yield cache
        finally:
            for h in handles:
                h.remove()

    def prefix_metrics(self) -> dict[str, float]:
        return self.prefix.metrics() if self.prefix is not None else {}

    def attention_model(self) -> torch.nn.Module:
        return self.model

    def layer_packer(self, num_tokens: int) -> LayerPacker:
        """A transfer buffer for ``num_tokens`` tokens, packed layer by layer (``on_layer``);
        the payload crc goes in with the header, once the push knows it."""
        i = self.info
        return LayerPacker(KvMeta(dtype_name(self.model.dtype), i.num_layers, i.num_kv_heads,
                                  i.head_dim, num_tokens, self.fingerprint))

    def _prefill(self, token_ids: list[int], params: Sampling, reuse_prefix: bool,
                 cache: DynamicCache) -> tuple[int, DynamicCache]:
        hashes: list[bytes] = []
        done = 0
        if self.prefix is not None and reuse_prefix:
            bt = self.prefix.block_tokens
            hashes = chain_hashes(token_ids, bt)
            # At least one token is computed: its logits give the first output token.
            hit = self.prefix.match(hashes, (len(token_ids) - 1) // bt)
            if hit:
                kv = torch.cat(hit, dim=3)  # [layers, 2, heads, tokens, head_dim]
                for i in range(kv.shape[0]):
                    cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
                done = len(hit) * bt
        ids = torch.tensor([token_ids[done:]], dtype=torch.long)
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        if self.prefix is not None and not hashes:
            hashes = chain_hashes(token_ids, self.prefix.block_tokens)
        if self.prefix is not None and len(hashes) > done // self.prefix.block_tokens:
            self._remember(out.past_key_values, hashes, done // self.prefix.block_tokens)
        return sample(out.logits[0, -1], params, len(token_ids)), out.past_key_values

    def _remember(self, cache: DynamicCache, hashes: list[bytes], first: int) -> None:
        """Copy the KV of full blocks ``first..`` into the prefix cache."""
        assert self.prefix is not None
        bt = self.prefix.block_tokens
        k = torch.stack([layer.keys[0] for layer in cache.layers])  # [layers, heads, T, d]
        v = torch.stack([layer.values[0] for layer in cache.layers])
        kv = torch.stack([k, v], dim=1)
        blocks = []
        for j in range(first, len(hashes)):
            block = kv[:, :, :, j * bt : (j + 1) * bt].clone()
            blocks.append((block, block.numel() * block.element_size()))
        self.prefix.insert(hashes, blocks)

    @torch.inference_mode()
    def decode_step(self, token: int, cache: DynamicCache, params: Sampling) -> int:
        position = cache.get_seq_length() + 1
        out = self.model(input_ids=torch.tensor([[token]], dtype=torch.long),
                         past_key_values=cache, use_cache=True)
        return sample(out.logits[0, -1], params, position)

    def pack(self, cache: DynamicCache, checksum: bool) -> tuple[KvMeta, np.ndarray]:
        """The request's KV as one contiguous transfer buffer."""
        return pack_kv(cache, self.fingerprint, checksum)

    def restore(self, buf: memoryview, max_new_tokens: int) -> tuple[KvMeta, DynamicCache]:
        """Verify a received buffer and copy it once into a cache sized for decoding."""
        meta, layers = unpack_kv(buf, self.fingerprint)
        return meta, cache_from_layers(layers, self.config, meta.num_tokens + max_new_tokens + 1)

    def attach_pool(self, pool_tokens: int, block_tokens: int) -> KvPool:
        """Give this runner a paged KV pool of ``pool_tokens`` slots and batch-decode over it."""
        use_paged_attention(self.model)
        attend.available()  # compile (or load) the attention kernel now, not in the 1st step
        self.pool = KvPool(self.config, -(-pool_tokens // block_tokens), block_tokens)
        return self.pool

    def restore_paged(self, buf: memoryview, table: BlockTable) -> tuple[KvMeta, PagedSeq]:
        """RecvScatter: verify a received buffer and copy it into the reserved ``table``."""
        assert self.pool is not None, "attach_pool first"
        meta = self.pool.scatter(buf, table, self.fingerprint)
        return meta, PagedSeq(table, meta.num_tokens)

    def decode_batch(self, tokens: list[int], seqs: list[PagedSeq],
                     params: list[Sampling]) -> list[int]:
        """One forward over every sequence (each fed its last token); the next tokens."""
        assert self.pool is not None, "attach_pool first"
        return decode_batch(self.model, self.pool, tokens, seqs, params)

    def warmup(self) -> None:
        _, cache = self.prefill([0, 1, 2, 3], Sampling())
        self.decode_step(4, cache, Sampling())
