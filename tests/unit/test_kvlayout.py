"""services.kv.layout: the KV buffer header, offsets and verification."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import pytest

from services.kv.layout import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    KvFormatError,
    KvMeta,
    decode_header,
    encode_header,
    kv_nbytes,
    payload_crc32,
    verify,
)

pytestmark = pytest.mark.unit

FP = "a" * 64


def _meta(**kw: object) -> KvMeta:
    base: dict[str, object] = dict(
        dtype="float16", num_layers=3, num_kv_heads=2, head_dim=8, num_tokens=5, fingerprint=FP
    )
    base.update(kw)
    return KvMeta(**base)  # type: ignore[arg-type]


def _buffer(meta: KvMeta, checksum: bool = True) -> bytearray:
    payload = bytes((i * 7 + 3) % 256 for i in range(meta.payload_nbytes))
    if checksum:
        meta = dataclasses.replace(meta, payload_crc32=payload_crc32(payload))
    return bytearray(encode_header(meta) + payload)


def test_header_round_trip() -> None:
    meta = _meta(payload_crc32=123456789, dtype="bfloat16")
    hdr = encode_header(meta)
    assert len(hdr) == HEADER_BYTES
    assert hdr[:4] == MAGIC
    assert decode_header(hdr) == meta
    assert decode_header(memoryview(hdr)) == meta


def test_header_prefix_fields() -> None:
    hdr = encode_header(_meta())
    magic, version, flags, jlen, jcrc = struct.unpack_from("<4sHHII", hdr, 0)
    assert (magic, version, flags) == (MAGIC, VERSION, 0)
    body = hdr[16 : 16 + jlen]
    assert zlib.crc32(body) == jcrc
    assert hdr[16 + jlen :] == b"\0" * (HEADER_BYTES - 16 - jlen)


def test_sizes_and_offsets() -> None:
    meta = _meta(dtype="float32", num_layers=4, num_kv_heads=3, head_dim=16, num_tokens=7)
    assert meta.itemsize == 4
    assert meta.tensor_nbytes == 3 * 7 * 16 * 4
    assert meta.layer_nbytes == 2 * meta.tensor_nbytes
    assert meta.payload_nbytes == 4 * meta.layer_nbytes
    assert meta.total_nbytes == HEADER_BYTES + meta.payload_nbytes
    assert meta.layer_offset(0) == HEADER_BYTES
    assert [meta.layer_offset(i + 1) - meta.layer_offset(i) for i in range(3)] == [
        meta.layer_nbytes
    ] * 3
    assert meta.layer_offset(4) == meta.total_nbytes  # one past the last layer is the end


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_kv_nbytes_matches_meta(dtype: str) -> None:
    meta = _meta(dtype=dtype, num_layers=5, num_kv_heads=4, head_dim=32, num_tokens=11)
    assert kv_nbytes(5, 4, 32, 11, dtype) == meta.total_nbytes


@pytest.mark.parametrize(
    "kw",
    [{"dtype": "int8"}, {"num_layers": 0}, {"num_kv_heads": -1}, {"head_dim": 0},
     {"num_tokens": 0}],
)
def test_meta_rejects_bad_shapes(kw: dict[str, object]) -> None:
    with pytest.raises(KvFormatError):
        _meta(**kw)


def test_oversized_metadata_does_not_fit() -> None:
    with pytest.raises(KvFormatError, match="fit"):
        encode_header(_meta(fingerprint="f" * HEADER_BYTES))


def test_bad_magic() -> None:
    buf = _buffer(_meta())
    buf[0:4] = b"NOPE"
    with pytest.raises(KvFormatError, match="magic"):
        decode_header(buf)
    with pytest.raises(KvFormatError, match="magic"):
        verify(buf)


def test_wrong_version() -> None:
    buf = _buffer(_meta())
    struct.pack_into("<H", buf, 4, VERSION + 1)
    with pytest.raises(KvFormatError, match="version"):
        decode_header(buf)


def test_flipped_json_byte_fails_header_checksum() -> None:
    buf = _buffer(_meta())
    buf[16 + 5] ^= 0x01  # inside the JSON body
    with pytest.raises(KvFormatError, match="checksum"):
        decode_header(buf)


def test_json_length_out_of_range() -> None:
    buf = _buffer(_meta())
    struct.pack_into("<I", buf, 8, HEADER_BYTES)
    with pytest.raises(KvFormatError, match="length"):
        decode_header(buf)


def test_valid_crc_over_bad_json_is_format_error() -> None:
    body = b'{"dtype":"float32"}'  # missing fields: KvMeta(**...) raises TypeError
    hdr = struct.pack("<4sHHII", MAGIC, VERSION, 0, len(body), zlib.crc32(body)) + body
    with pytest.raises(KvFormatError, match="corrupt"):
        decode_header(hdr.ljust(HEADER_BYTES, b"\0"))


@pytest.mark.parametrize("n", [0, 16, HEADER_BYTES - 1])
def test_buffer_shorter_than_header(n: int) -> None:
    buf = _buffer(_meta())[:n]
    with pytest.raises(KvFormatError, match="short"):
        decode_header(buf)


def test_verify_accepts_good_buffer() -> None:
    meta = _meta()
    buf = _buffer(meta)
    got = verify(buf, FP)
    assert got.payload_crc32 >= 0
    assert dataclasses.replace(got, payload_crc32=-1) == meta
    assert verify(bytes(buf)) == got
    assert verify(memoryview(buf), FP) == got


@pytest.mark.parametrize("delta", [-1, 1])
def test_verify_rejects_wrong_length(delta: int) -> None:
    buf = _buffer(_meta())
    buf = buf[:-1] if delta < 0 else buf + b"\0"
    with pytest.raises(KvFormatError, match="bytes"):
        verify(buf, FP)


def test_verify_detects_flipped_payload_byte_with_checksum() -> None:
    meta = _meta()
    buf = _buffer(meta, checksum=True)
    buf[meta.layer_offset(1) + 3] ^= 0x80
    with pytest.raises(KvFormatError, match="checksum"):
        verify(buf, FP)


def test_verify_without_checksum_skips_payload_check() -> None:
    meta = _meta()
    buf = _buffer(meta, checksum=False)
    buf[HEADER_BYTES] ^= 0xFF
    assert verify(buf, FP).payload_crc32 == -1


def test_verify_fingerprint_mismatch_mentions_model() -> None:
    buf = _buffer(_meta(fingerprint="1234567890abcdef" + "0" * 48))
    with pytest.raises(KvFormatError, match="model") as ei:
        verify(buf, "fedcba0987654321" + "0" * 48)
    msg = str(ei.value)
    assert "1234567890abcdef" in msg and "fedcba0987654321" in msg


def test_verify_without_expected_fingerprint_accepts_any_model() -> None:
    assert verify(_buffer(_meta(fingerprint="other"))).fingerprint == "other"


def test_payload_crc32_is_zlibs_crc32_whole_and_chained() -> None:
    """ISA-L computes the checksum; the value on the wire stays zlib's CRC-32, so a
    prefill and a decode of different builds (or a relay) agree on it."""
    import os

    data = os.urandom(300_001)
    assert payload_crc32(data) == zlib.crc32(data)
    assert payload_crc32(memoryview(data)[7:]) == zlib.crc32(data[7:])
    part = payload_crc32(data[:1234])
    assert payload_crc32(data[1234:], part) == zlib.crc32(data)
    assert payload_crc32(b"") == 0
