"""A request's KV as one contiguous buffer (see ``services.kv.layout``).

``pack_kv`` copies each layer's K and V into one preallocated buffer: one copy,
laid out layer-major so a layer can be sent on its own (``LayerPacker`` does it layer
by layer during the forward, for per-layer transfer). ``unpack_kv`` returns
per-layer tensors that are views into the received buffer (no copy) and
rebuilds a transformers ``DynamicCache`` from them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig

from services.kv.layout import (
    HEADER_BYTES,
    KvFormatError,
    KvMeta,
    byte_view,
    encode_header,
    payload_crc32,
    verify,
)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The header's name for a torch dtype."""
    return _NAMES[dtype]


def pack_kv(
    cache: DynamicCache, fingerprint: str, checksum: bool = True
) -> tuple[KvMeta, np.ndarray]:
    layers = cache.layers
    k0 = layers[0].keys
    if k0.shape[0] != 1:
        raise ValueError("pack_kv packs one request (batch size 1)")
    _, heads, tokens, head_dim = k0.shape
    packer = LayerPacker(KvMeta(_NAMES[k0.dtype], len(layers), heads, head_dim, tokens,
                                fingerprint))
    for i in range(len(layers)):
        packer(i, cache)
    packer.header(payload_crc32(packer.buf[HEADER_BYTES:]) if checksum else -1)
    return packer.meta, packer.buf


class LayerPacker:
    """Packs a prefill's cache into the transfer buffer one layer at a time: all at once
    after the forward (``pack_kv``), or as each decoder layer finishes (per-layer
    transfer: ``transport.layers``). The header goes in last (``header``), with the
    payload's crc32 (-1: none)."""

    def __init__(self, meta: KvMeta) -> None:
        self.meta = meta
        self.buf = np.empty(meta.total_nbytes, dtype=np.uint8)
        payload = torch.from_numpy(self.buf[HEADER_BYTES:]).view(_TORCH_DTYPES[meta.dtype])
        self._payload = payload.view(meta.num_layers, 2, meta.num_kv_heads, meta.num_tokens,
                                     meta.head_dim)

    def __call__(self, layer: int, cache: DynamicCache) -> None:
        kv = cache.layers[layer]
        self._payload[layer, 0].copy_(kv.keys[0])
        self._payload[layer, 1].copy_(kv.values[0])

    def header(self, crc: int) -> bytes:
        self.meta = dataclasses.replace(self.meta, payload_crc32=crc)
        raw = encode_header(self.meta)
        self.buf[:HEADER_BYTES] = np.frombuffer(raw, dtype=np.uint8)
        return raw


def unpack_kv(
    buf: memoryview | np.ndarray, expected_fingerprint: str
) -> tuple[KvMeta, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Verify and view the buffer as per-layer ([1, heads, tokens, head_dim]) K, V."""
    arr = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf
    meta = verify(byte_view(arr), expected_fingerprint)
    if not arr.flags.writeable:
        arr = arr.copy()  # torch wants writable memory; only read-only sources pay a copy
    payload = torch.from_numpy(arr[HEADER_BYTES:]).view(_TORCH_DTYPES[meta.dtype])
    payload = payload.view(meta.num_layers, 2, meta.num_kv_heads, meta.num_tokens, meta.head_dim)
    return meta, [(payload[i, 0].unsqueeze(0), payload[i, 1].unsqueeze(0))
                  for i in range(meta.num_layers)]


def cache_from_layers(
    layers: list[tuple[torch.Tensor, torch.Tensor]], config: PretrainedConfig,
    capacity: int = 0,
) -> DynamicCache:
    """Rebuild a cache; with ``capacity`` (tokens) it is preallocated for decoding."""
    if len(layers) != config.num_hidden_layers:
        raise KvFormatError(
            f"KV has {len(layers)} layers, the model has {config.num_hidden_layers}"
        )
    if capacity:
        from services.engine.cache import preallocated_cache

        return preallocated_cache(layers, config, capacity)
    return DynamicCache(ddp_cache_data=layers, config=config)
