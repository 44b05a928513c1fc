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
memory-bound CPU; ``engine.packed`` makes those reads faster). Attention is ours: a
transformers attention function registered as ``pdserve_paged``. Every sequence whose
table is one run of slots (the allocator's first choice) is served by ONE call per layer
of a compiled kernel (``engine.attend``): it writes each sequence's new K/V into its
slot and reads exactly that sequence's tokens, no padding and no mask. The rest (a
fragmented table) is read one by one with transformers' own SDPA. When the kernel is
unavailable (``attend.available()``), the step writes the new K/V with ``index_copy_``
and reads with SDPA:

- the sequences that start on a lane boundary (``paged``: the allocator's first choice
  for a table that fits a lane) as ONE padded batch: the lanes are at a fixed stride in
  the storage, so ``as_strided`` gives ``[lanes, kv_heads, width, head_dim]`` with no
  copy, and one SDPA call (queries grouped by KV head, as transformers does for a
  single query token, and a boolean mask of each row's length) serves them all;
- the others (a long prompt that spans lanes, a fragmented table, or a lone sequence)
  one by one with transformers' own SDPA over exactly that sequence's tokens.

A padded row reads slots past its sequence's end under the mask. They must hold finite
numbers (a NaN times a zero weight is NaN), so the storage is allocated zero-filled
(an anonymous mapping: zero pages, committed as they are first written) and only ever
holds KV afterwards. Without the paged context the function is plain ``sdpa``, so the
same loaded model still prefills normally.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from services.engine import attend
from services.engine.kv import _TORCH_DTYPES
from services.engine.paged import BlockAllocator, BlockTable
from services.engine.sampling import Sampling, sample
from services.kv.layout import HEADER_BYTES, KvFormatError, KvMeta, verify

ATTN_NAME = "pdserve_paged"
_CTX_KWARG = "pdserve_paged"
# Lanes a pool is cut into (``paged``): decode's default slots (b_d). More sequences than
# lanes still decode, the extra ones read one by one.
LANES = 16


class KvPool(BlockAllocator):
    """Block accounting plus the tensor that holds the blocks."""

    def __init__(self, config: PretrainedConfig, num_blocks: int, block_tokens: int,
                 dtype: torch.dtype = torch.float32, lanes: int = LANES) -> None:
        super().__init__(num_blocks, block_tokens,
                         self.bytes_per_block(config, block_tokens, dtype.itemsize),
                         lane_blocks=num_blocks // lanes if lanes > 1 else 0)
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        self.dtype = dtype
        shape = (self.num_layers, 2, self.num_kv_heads, num_blocks * block_tokens,
                 self.head_dim)
        # Zero pages from the kernel, committed only as blocks are first written: padded
        # lane reads may touch never-written slots, which must be finite (see above).
        self._mapping = mmap.mmap(-1, math.prod(shape) * dtype.itemsize,
                                  flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.storage = torch.frombuffer(self._mapping, dtype=dtype).view(shape)

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
        meta = verify(arr.data, fingerprint)
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
class _Lanes:
    """The lane-aligned sequences of a step, read as one padded batch: rows are lanes
    ``first .. first + rows - 1`` (a lane in between with no sequence of this step is a
    row too, fully ignored)."""

    first: int
    rows: int
    width: int  # padded length: the longest of these sequences, this step's token included
    mask: torch.Tensor  # [rows, 1, 1, width] bool: slot < that row's length
    row: torch.Tensor  # [n] the row of each of these sequences, which are batch 0..n-1


@dataclass
class _Runs:
    """The sequences read by the compiled kernel (``engine.attend``): batch 0..n-1, each
    one run of slots ``starts[i] .. starts[i] + lengths[i] - 1`` (this step's included)."""

    n: int
    starts: np.ndarray
    lengths: np.ndarray


@dataclass
class _StepContext:
    pool: KvPool
    slots: torch.Tensor  # slot of the new token of each sequence after the runs' ones
    # Per sequence read one by one, computed once per step (not per layer): its batch
    # position and (first slot, tokens) for a contiguous table, else (None, slot indices).
    reads: list[tuple[int, int | None, int | torch.Tensor]]
    lanes: _Lanes | None
    runs: _Runs | None = None

    def kv(self, layer: int, start: int | None, n: int | torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
        if start is not None:
            assert isinstance(n, int)
            kv = self.pool.storage[layer, :, :, start : start + n]
        else:
            assert isinstance(n, torch.Tensor)
            kv = self.pool.storage[layer].index_select(2, n)
        return kv[0].unsqueeze(0), kv[1].unsqueeze(0)

    def lane_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, kv_heads, width, head_dim]`` K and V of the lanes: views, no copy."""
        assert self.lanes is not None
        ln, st = self.lanes, self.pool.storage
        heads, slots, d = st.shape[2], st.shape[3], st.shape[4]
        size = (ln.rows, heads, ln.width, d)
        stride = (self.pool.lane_tokens * d, slots * d, d, 1)
        base = ln.first * self.pool.lane_tokens * d
        return (st[layer, 0].as_strided(size, stride, st[layer, 0].storage_offset() + base),
                st[layer, 1].as_strided(size, stride, st[layer, 1].storage_offset() + base))


def _paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    ctx: _StepContext | None = kwargs.pop(_CTX_KWARG, None)
    if ctx is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    layer = module.layer_idx
    store = ctx.pool.storage[layer]
    b, heads, _, d = query.shape
    out = query.new_empty((b, 1, heads, d))  # what sdpa_attention_forward returns
    runs = ctx.runs
    first = runs.n if runs is not None else 0  # the kernel writes the runs' new K/V itself
    if first < b:
        store[0].index_copy_(1, ctx.slots, key[first:, :, 0].transpose(0, 1))
        store[1].index_copy_(1, ctx.slots, value[first:, :, 0].transpose(0, 1))
    if runs is not None:
        n = runs.n
        out[:n, 0] = attend.decode_attention(
            query[:n, :, 0], key[:n, :, 0], value[:n, :, 0], store, runs.starts,
            runs.lengths, kwargs.get("scaling") or d ** -0.5)
    ln = ctx.lanes
    if ln is not None:
        k, v = ctx.lane_kv(layer)
        kv_heads = k.shape[1]
        # One query token: group the query heads by the KV head they read (transformers'
        # pack_gqa), so K/V are read once per KV head and never repeated.
        # decode_batch puts the lane sequences first, in lane order: with no empty lane
        # between them, rows are batch positions 0..n-1 and no index op is needed.
        n = len(ln.row)
        q = query[:n].reshape(n, kv_heads, heads // kv_heads, d)
        if ln.rows != n:
            q = q.new_zeros((ln.rows, *q.shape[1:])).index_copy_(0, ln.row, q)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=ln.mask, scale=kwargs.get("scaling"))
        if ln.rows != n:
            o = o.index_select(0, ln.row)
        out[:n, 0] = o.reshape(n, heads, d)
    for i, start, n in ctx.reads:
        k, v = ctx.kv(layer, start, n)
        o, _ = sdpa_attention_forward(module, query[i : i + 1], k, v, None, **kwargs)
        out[i] = o[0]
    return out, None


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
    # The kernel's sequences (one run of slots each) or else the lane sequences, in lane
    # order, go first (see _paged_attention); the answer is put back in the caller's
    # order at the end.
    kernel = attend.available()
    if kernel:
        first = [s.table.run_start is None for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: (first[i], i))
    else:
        lanes_of = [pool.lane_of(s.table) for s in seqs]
        order = sorted(range(len(seqs)),
                       key=lambda i: (lanes_of[i] is None, lanes_of[i] or 0, i))
    seqs = [seqs[i] for i in order]
    tokens = [tokens[i] for i in order]
    params = [params[i] for i in order]
    runs = _runs(seqs) if kernel else None
    done = runs.n if runs is not None else 0
    ctx = _StepContext(pool, torch.tensor([s.table.slot(s.length) for s in seqs[done:]],
                                          dtype=torch.long), [],
                       None if kernel else _lanes(pool, seqs), runs)
    if ctx.lanes is not None:
        done = len(ctx.lanes.row)
    for i, s in enumerate(seqs):
        if i < done:
            continue
        start, n = s.table.run_start, s.length + 1
        ctx.reads.append((i, start, n) if start is not None else
                         (i, None, torch.tensor(s.table.slots(n), dtype=torch.long)))
    ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)
    pos = torch.tensor([s.length for s in seqs], dtype=torch.long).unsqueeze(1)
    out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1,
                **{_CTX_KWARG: ctx})
    logits = out.logits[:, -1]
    # Greedy rows in one argmax over the batch (the same first-max index as per row).
    greedy = logits.argmax(-1).tolist() if any(p.temperature <= 0.0 for p in params) else []
    chosen = [0] * len(seqs)
    for b, s in enumerate(seqs):
        s.length += 1
        chosen[order[b]] = greedy[b] if params[b].temperature <= 0.0 else \
            sample(logits[b], params[b], s.length)
    return chosen


def _runs(seqs: list[PagedSeq]) -> _Runs | None:
    """The leading sequences whose table is one run of slots (decode_batch sorts them
    first): the kernel reads exactly their tokens, from one sequence up."""
    starts = []
    for s in seqs:
        start = s.table.run_start
        if start is None:
            break
        starts.append(start)
    if not starts:
        return None
    lengths = [s.length + 1 for s in seqs[:len(starts)]]
    return _Runs(len(starts), np.array(starts, np.int64), np.array(lengths, np.int64))


def _lanes(pool: KvPool, seqs: list[PagedSeq]) -> _Lanes | None:
    """This step's lane batch; None when fewer than two sequences sit in lanes (a lone
    sequence reads exactly its own tokens, as a batch-1 ``generate`` does)."""
    members = [(pool.lane_of(s.table), i, s.length + 1) for i, s in enumerate(seqs)]
    found = [(lane, i, n) for lane, i, n in members if lane is not None]
    if len(found) < 2:
        return None
    assert [i for _, i, _ in found] == list(range(len(found))), "lane sequences go first"
    first = min(lane for lane, _, _ in found)
    rows = max(lane for lane, _, _ in found) - first + 1
    lengths = torch.ones(rows, dtype=torch.long)  # an empty row attends to slot 0 only
    for lane, _, n in found:
        lengths[lane - first] = n
    width = int(lengths.max())
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).view(rows, 1, 1, width)
    return _Lanes(first, rows, width, mask,
                  torch.tensor([lane - first for lane, _, _ in found], dtype=torch.long))
