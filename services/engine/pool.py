"""The paged KV pool's storage, RecvScatter, and the batched paged-attention decode step.

Storage is one tensor per process, ``[layers, 2 (K/V), kv_heads, num_blocks * block, head_dim]``:
blocks are ranges of the token axis. A request whose blocks form one run (the
allocator's first choice, see ``paged``) is read by attention as a strided view of
its slots, with no gather; a fragmented table is gathered with ``index_select``.

RecvScatter (``scatter``) restores a received contiguous KV buffer
(``services.kv.layout``: header + layer-major K/V) into a reserved table: one
copy per layer and per K/V for a run, an ``index_copy_`` otherwise.

The batched step (``decode_batch``) runs ONE forward over all active sequences, each
fed one token at its own position. Projections, MLP and LM head see ``[B, 1, hidden]``
(the weights are read once per step, which is what makes decode batching pay on a
memory-bound CPU). Attention is ours: a transformers attention function registered as
``pdserve_paged`` writes each sequence's new K/V into its slot, then runs transformers'
own SDPA attention per sequence over exactly that sequence's tokens, so every
sequence sees the same shapes and values as a batch-1 ``generate`` (token identity),
and no step pays for padding. Without the paged context it is plain ``sdpa``, so the
same loaded model still prefills normally.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from services.engine.kv import _TORCH_DTYPES
from services.engine.paged import BlockAllocator, BlockTable
from services.engine.sampling import Sampling, sample
from services.kv.layout import HEADER_BYTES, KvFormatError, KvMeta, verify

ATTN_NAME = "pdserve_paged"
_CTX_KWARG = "pdserve_paged"


class KvPool(BlockAllocator):
    """Block accounting plus the tensor that holds the blocks."""

    def __init__(self, config: PretrainedConfig, num_blocks: int, block_tokens: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num_blocks, block_tokens,
                         self.bytes_per_block(config, block_tokens, dtype.itemsize))
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.dtype = dtype
        # Never read before written (scatter or the step's own write), so no zero-fill:
        # pages are only touched as blocks are first used.
        self.storage = torch.empty((self.num_layers, 2, self.num_kv_heads,
                                    num_blocks * block_tokens, self.head_dim), dtype=dtype)

    @staticmethod
    def bytes_per_block(config: PretrainedConfig, block_tokens: int, itemsize: int = 4) -> int:
        head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        return (config.num_hidden_layers * 2 * config.num_key_value_heads * block_tokens
                * head_dim * itemsize)

    def scatter(self, buf: memoryview | np.ndarray, table: BlockTable,
                fingerprint: str | None) -> KvMeta:
        """RecvScatter: verify a contiguous KV buffer and copy it into ``table``'s slots."""
        arr = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, dtype=np.uint8)
        meta = verify(memoryview(arr), fingerprint)
        if (meta.num_layers, meta.num_kv_heads, meta.head_dim) != \
                (self.num_layers, self.num_kv_heads, self.head_dim):
            raise KvFormatError(
                f"KV shape (layers, heads, head_dim) = ({meta.num_layers}, {meta.num_kv_heads}, "
                f"{meta.head_dim}) does not match the pool's ({self.num_layers}, "
                f"{self.num_kv_heads}, {self.head_dim})")
        if _TORCH_DTYPES[meta.dtype] != self.dtype:
            raise KvFormatError(f"KV dtype {meta.dtype} does not match the pool's {self.dtype}")
        n = meta.num_tokens
        if n > table.capacity:
            raise KvFormatError(f"KV of {n} tokens exceeds the reserved {table.capacity} slots")
        if not arr.flags.writeable:
            arr = arr.copy()  # torch wants writable memory; only read-only sources pay a copy
        payload = torch.from_numpy(arr[HEADER_BYTES:]).view(self.dtype)
        payload = payload.view(meta.num_layers, 2, meta.num_kv_heads, n, meta.head_dim)
        start = table.run_start
        if start is not None:
            self.storage[:, :, :, start : start + n].copy_(payload)
        else:
            idx = torch.tensor(table.slots(n), dtype=torch.long)
            for layer in range(self.num_layers):
                self.storage[layer].index_copy_(2, idx, payload[layer])
        return meta

    def gather(self, table: BlockTable, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first ``n`` tokens, ``[1, kv_heads, n, head_dim]`` (a view for a run)."""
        start = table.run_start
        if start is not None:
            kv = self.storage[layer, :, :, start : start + n]
        else:
            kv = self.storage[layer].index_select(2, torch.tensor(table.slots(n)))
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)


@dataclass
class PagedSeq:
    """One decoding request's place in the pool: its table and how many tokens it holds."""

    table: BlockTable
    length: int


@dataclass
class _StepContext:
    pool: KvPool
    slots: torch.Tensor  # [B] slot of each sequence's new token
    # Per sequence, computed once per step (not per layer): (first slot, tokens) for a
    # contiguous table, else (None, slot indices to gather).
    reads: list[tuple[int | None, int | torch.Tensor]]

    def kv(self, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self.reads[b]
        if start is not None:
            assert isinstance(n, int)
            kv = self.pool.storage[layer, :, :, start : start + n]
        else:
            assert isinstance(n, torch.Tensor)
            kv = self.pool.storage[layer].index_select(2, n)
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)


def _paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    ctx: _StepContext | None = kwargs.pop(_CTX_KWARG, None)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = module.layer_idx
    store = ctx.pool.storage[layer]
    store[0].index_copy_(1, ctx.slots, key[:, :, 0].transpose(0, 1))
    store[1].index_copy_(1, ctx.slots, value[:, :, 0].transpose(0, 1))
    outs = []
    for b in range(len(ctx.reads)):
        k, v = ctx.kv(layer, b)
        out, _ = sdpa_attention_forward(module, query[b : b + 1], k, v, None, **kwargs)
        outs.append(out)
    return torch.cat(outs, 0), None


AttentionInterface.register(ATTN_NAME, _paged_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def use_paged_attention(model: torch.nn.Module) -> None:
    """Switch a loaded model to the ``pdserve_paged`` attention (sdpa unless paged)."""
    model.set_attn_implementation(ATTN_NAME)


@torch.inference_mode()
def decode_batch(model: torch.nn.Module, pool: KvPool, tokens: list[int],
                 seqs: list[PagedSeq], params: list[Sampling]) -> list[int]:
    """One forward for every sequence; each is fed its last token and grows by one."""
    for s in seqs:
        if s.length + 1 > s.table.capacity:
            raise IndexError(f"{s.table.owner} has no reserved slot for token {s.length}")
    reads: list[tuple[int | None, int | torch.Tensor]] = []
    for s in seqs:
        start, n = s.table.run_start, s.length + 1
        reads.append((start, n) if start is not None else
                     (None, torch.tensor(s.table.slots(n), dtype=torch.long)))
    ctx = _StepContext(pool, torch.tensor([s.table.slot(s.length) for s in seqs],
                                          dtype=torch.long), reads)
    ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
    pos = torch.tensor([s.length for s in seqs], dtype=torch.long).unsqueeze(1)
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1,
                **{_CTX_KWARG: ctx})
    logits = out.logits[:, -1]
    chosen = []
    for b, s in enumerate(seqs):
        s.length += 1
        chosen.append(sample(logits[b], params[b], s.length))
    return chosen
