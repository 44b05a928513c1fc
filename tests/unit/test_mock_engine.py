"""The mock engine: latency model, cached prefixes, real-sized KV buffers, no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from services.engine.mock import BLOCK, LatencyModel, MockRunner, block_hashes
from services.engine.sampling import Sampling
from services.kv.layout import KvFormatError, kv_nbytes
from services.model.profile import profile_path

pytestmark = pytest.mark.unit


@pytest.fixture()
def fast_profile(tmp_path: Path) -> str:
    prof = json.loads(profile_path("scaled-gpu").read_text())
    prof["time_scale"] = 0.0  # no sleeping in unit tests
    path = tmp_path / "fast.json"
    path.write_text(json.dumps(prof))
    return f"mock:{path}"


def test_latency_model_formula() -> None:
    m = LatencyModel(a=10, b=2, c=0.01, d0=5, d1=1, d2=0.1)
    assert m.prefill_ms(100) == pytest.approx(10 + 200 + 100)
    assert m.prefill_ms(100, cached=60) == pytest.approx(10 + 80 + 0.01 * (10000 - 3600))
    assert m.prefill_ms(100, cached=500) == pytest.approx(10)  # cache cannot exceed the prompt
    assert m.step_ms([100]) == pytest.approx(15)
    assert m.step_ms([100, 300]) == pytest.approx(5 + 1 + 40)


def test_block_hashes_chain_so_equal_prefixes_share_leading_hashes() -> None:
    a = block_hashes(list(range(3 * BLOCK + 5)))
    b = block_hashes(list(range(2 * BLOCK)) + [7] * BLOCK)
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]


def test_prefix_hits_and_deterministic_tokens(fast_profile: str) -> None:
    r = MockRunner(fast_profile)
    ids = list(range(16, 16 + 4 * BLOCK))
    t1, s1 = r.prefill(ids, Sampling())
    assert r.prefix_hits_tokens == 0
    r.prefill(ids + [99] * 10, Sampling())
    assert r.prefix_hits_tokens == 4 * BLOCK
    assert t1 == r.prefill(ids, Sampling())[0]  # deterministic
    toks = [r.decode_step(t1, s1, Sampling()) for _ in range(5)]
    assert all(16 <= t < 256 for t in toks) and s1.length == len(ids) + 5


def test_kv_buffer_has_the_modelled_size_and_verifies(fast_profile: str) -> None:
    r = MockRunner(fast_profile)
    _, state = r.prefill(list(range(20, 120)), Sampling())
    _, buf = r.pack(state, checksum=True)
    i = r.info
    assert buf.nbytes == kv_nbytes(i.num_layers, i.num_kv_heads, i.head_dim, 100, i.kv_dtype)
    assert buf.nbytes - 512 == 100 * 12 * 1024  # 12 KiB per token for this profile
    meta2, restored = r.restore(memoryview(buf), 10)
    assert meta2.num_tokens == 100 and restored.length == 100
    buf[600] ^= 1
    with pytest.raises(KvFormatError):
        r.restore(memoryview(buf), 10)


def test_unknown_profile_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown mock profile"):
        profile_path("nope")


def test_the_mock_engine_does_not_import_torch(fast_profile: str) -> None:
    code = ("import sys; from services.engine.factory import load_runner; "
            f"r = load_runner({fast_profile!r}); r.prefill([1,2,3], __import__("
            "'services.engine.sampling', fromlist=['Sampling']).Sampling()); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
