"""services.worker.host.HostConfig: one config for both roles, and settings changed at
assignment (parsed as the flags are, unknown or bad ones refused clearly)."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.common.errors import InvalidArgument
from services.decode.main import DecodeConfig
from services.engine.worker import WorkerConfig
from services.prefill.main import PrefillConfig
from services.worker.host import HostConfig

pytestmark = pytest.mark.unit


def test_role_configs_keep_each_roles_defaults() -> None:
    cfg = HostConfig()
    assert cfg.role == "idle"
    assert cfg.prefill().slots == WorkerConfig().slots  # b_p default
    assert cfg.decode().slots == DecodeConfig().slots  # b_d default
    assert cfg.prefill().prefix_cache_mb == PrefillConfig().prefix_cache_mb
    assert cfg.decode().kv_pool_tokens == DecodeConfig().kv_pool_tokens
    assert HostConfig(prefill_slots=2).prefill().slots == 2


def test_settings_are_parsed_like_flags() -> None:
    cfg = HostConfig(group="a").with_settings({"slots": "8", "kv_checksum": "off",
                                               "prefill_slots": "3"}, group="b")
    assert (cfg.slots, cfg.kv_checksum, cfg.prefill_slots, cfg.group) == (8, False, 3, "b")
    assert cfg.decode().slots == 8 and cfg.prefill().slots == 3


@pytest.mark.parametrize(("settings", "reason"), [
    ({"no_such_field": "1"}, "UNKNOWN_SETTING"),
    ({"slots": "eight"}, "BAD_SETTING"),
    ({"kv_pool_tokens": "1", "kv_pool_block_tokens": "16"}, "BAD_SETTING"),
])
def test_bad_settings_are_refused(settings: dict[str, str], reason: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        HostConfig().with_settings(settings)
    assert ei.value.reason == reason


def test_bad_role_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="role"):
        HostConfig(role="gateway")
