"""services.engine.kv: pack/unpack a DynamicCache to/from one contiguous buffer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from services.engine.kv import cache_from_layers, pack_kv, unpack_kv
from services.kv.layout import HEADER_BYTES, KvFormatError, decode_header, verify

pytestmark = pytest.mark.unit

FP = "0123456789abcdef" * 4
LAYERS, HEADS, TOKENS, HEAD_DIM = 3, 2, 5, 8


@pytest.fixture(scope="module")
def cfg() -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=HEADS,
        hidden_size=4 * HEAD_DIM, head_dim=HEAD_DIM, intermediate_size=64, vocab_size=64,
    )


def _layers(dtype: torch.dtype, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype),
         torch.randn(1, HEADS, TOKENS, HEAD_DIM, generator=g).to(dtype))
        for _ in range(LAYERS)
    ]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_unpack_round_trip_is_bit_exact(cfg: LlamaConfig, dtype: torch.dtype) -> None:
    layers = _layers(dtype)
    cache = DynamicCache(ddp_cache_data=layers, config=cfg)
    meta, buf = pack_kv(cache, FP)
    assert buf.dtype == np.uint8 and buf.shape == (meta.total_nbytes,)
    assert (meta.num_layers, meta.num_kv_heads, meta.num_tokens, meta.head_dim) == (
        LAYERS, HEADS, TOKENS, HEAD_DIM)
    assert meta.dtype == str(dtype).removeprefix("torch.")
    assert meta.fingerprint == FP and meta.payload_crc32 >= 0
    assert decode_header(buf) == meta

    meta2, got = unpack_kv(buf, FP)
    assert meta2 == meta
    assert len(got) == LAYERS
    for (k, v), (k2, v2) in zip(layers, got, strict=True):
        assert k2.shape == k.shape and k2.dtype == dtype
        assert torch.equal(k, k2) and torch.equal(v, v2)


def test_layout_is_layer_major_k_then_v(cfg: LlamaConfig) -> None:
    layers = _layers(torch.float32, seed=1)
    meta, buf = pack_kv(DynamicCache(ddp_cache_data=layers, config=cfg), FP)
    raw = buf.tobytes()
    for i, (k, v) in enumerate(layers):
        off = meta.layer_offset(i)
        assert raw[off : off + meta.tensor_nbytes] == _tensor_bytes(k[0])
        assert raw[off + meta.tensor_nbytes : off + meta.layer_nbytes] == _tensor_bytes(v[0])
    k1 = layers[1][0]
    assert raw[meta.layer_offset(1) : meta.layer_offset(1) + meta.tensor_nbytes] == (
        _tensor_bytes(k1))
    assert meta.layer_offset(0) == HEADER_BYTES


def test_unpack_from_readonly_bytes_and_memoryview(cfg: LlamaConfig) -> None:
    layers = _layers(torch.float16, seed=2)
    _, buf = pack_kv(DynamicCache(ddp_cache_data=layers, config=cfg), FP)
    for src in (memoryview(buf.tobytes()), memoryview(bytearray(buf.tobytes()))):
        _, got = unpack_kv(src, FP)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(layers, got, strict=True))


def test_unpack_views_the_writable_buffer_without_copy(cfg: LlamaConfig) -> None:
    meta, buf = pack_kv(DynamicCache(ddp_cache_data=_layers(torch.float32), config=cfg), FP)
    _, got = unpack_kv(buf, FP)
    buf[meta.layer_offset(0) : meta.layer_offset(0) + 4] = np.frombuffer(
        np.float32(42.0).tobytes(), dtype=np.uint8)
    assert got[0][0][0, 0, 0, 0].item() == 42.0


def test_pack_without_checksum(cfg: LlamaConfig) -> None:
    meta, buf = pack_kv(DynamicCache(ddp_cache_data=_layers(torch.float32), config=cfg), FP,
                        checksum=False)
    assert meta.payload_crc32 == -1
    buf[HEADER_BYTES] ^= 0xFF  # undetectable without a checksum
    assert verify(memoryview(buf), FP) == meta


def test_unpack_detects_corruption_and_model_mismatch(cfg: LlamaConfig) -> None:
    meta, buf = pack_kv(DynamicCache(ddp_cache_data=_layers(torch.float32), config=cfg), FP)
    with pytest.raises(KvFormatError, match="model"):
        unpack_kv(buf, "f" * 64)
    bad = buf.copy()
    bad[meta.layer_offset(2) + 1] ^= 0x10
    with pytest.raises(KvFormatError, match="checksum"):
        unpack_kv(bad, FP)


def test_pack_rejects_batches(cfg: LlamaConfig) -> None:
    layers = [(torch.zeros(2, HEADS, TOKENS, HEAD_DIM), torch.zeros(2, HEADS, TOKENS, HEAD_DIM))
              for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="batch"):
        pack_kv(DynamicCache(ddp_cache_data=layers, config=cfg), FP)


def test_cache_from_layers_round_trip(cfg: LlamaConfig) -> None:
    layers = _layers(torch.float32, seed=3)
    _, buf = pack_kv(DynamicCache(ddp_cache_data=layers, config=cfg), FP)
    _, got = unpack_kv(buf, FP)
    cache = cache_from_layers(got, cfg)
    assert len(cache.layers) == LAYERS
    assert cache.get_seq_length() == TOKENS
    for (k, v), layer in zip(layers, cache.layers, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


@pytest.mark.parametrize("n", [LAYERS - 1, LAYERS + 1, 0])
def test_cache_from_layers_rejects_wrong_layer_count(cfg: LlamaConfig, n: int) -> None:
    layers = _layers(torch.float32)
    layers = (layers + layers)[:n]
    with pytest.raises(KvFormatError, match="layers"):
        cache_from_layers(layers, cfg)
