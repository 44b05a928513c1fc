"""Decode's pool settings and prefill's prefix-cache settings: flags, env, checks."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError, load_config
from services.decode.main import DecodeConfig
from services.engine.worker import WorkerConfig
from services.prefill.main import PrefillConfig

pytestmark = pytest.mark.unit


def test_decode_pool_settings_from_flags_and_env() -> None:
    cfg = load_config(DecodeConfig, argv=["--kv-pool-tokens", "4096"],
                      env={"PDSERVE_KV_POOL_BLOCK_TOKENS": "32", "PDSERVE_MODEL": "tiny"})
    assert (cfg.kv_pool_tokens, cfg.kv_pool_block_tokens, cfg.model) == (4096, 32, "tiny")
    assert cfg.slots == 16  # b_d: the continuous batch


def test_prefill_prefix_settings_from_flags() -> None:
    cfg = load_config(PrefillConfig, argv=["--prefix-cache-mb", "0"])
    assert cfg.prefix_cache_mb == 0 and cfg.prefix_block_tokens == 64


@pytest.mark.parametrize(("cls", "bad"), [
    (DecodeConfig, {"kv_pool_block_tokens": 0}),
    (DecodeConfig, {"kv_pool_tokens": 8, "kv_pool_block_tokens": 16}),
    (PrefillConfig, {"prefix_cache_mb": -1}),
    (PrefillConfig, {"prefix_block_tokens": 0}),
])
def test_bad_settings_are_refused(cls: type, bad: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        cls(**bad)


def test_a_plain_worker_config_keeps_its_values() -> None:
    base = WorkerConfig(slots=3, model="tiny", group="conv")
    d, p = DecodeConfig.of(base), PrefillConfig.of(base)
    assert (d.slots, d.model, d.group, d.kv_pool_tokens) == (3, "tiny", "conv", 32768)
    assert (p.slots, p.prefix_cache_mb) == (3, 256)
    assert DecodeConfig.of(d) is d
