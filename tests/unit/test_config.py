"""services.common.config: defaults < PDSERVE_* env < CLI, parsing, validation."""

from __future__ import annotations

import dataclasses

import pytest

from services.common.config import ConfigError, ModelConfig, ServiceConfig, as_env, load_config
from services.engine.worker import WorkerConfig
from services.gateway.main import GatewayConfig
from services.kvstore.main import KvStoreConfig

pytestmark = pytest.mark.unit


def test_defaults_come_from_the_dataclass() -> None:
    cfg = load_config(ServiceConfig, argv=[], env={})
    assert cfg == ServiceConfig()
    assert cfg.port == 0 and cfg.group == "default" and cfg.heartbeat_s == 1.0


def test_env_overrides_default_and_is_typed() -> None:
    cfg = load_config(
        ServiceConfig,
        argv=[],
        env={"PDSERVE_PORT": "7000", "PDSERVE_HEARTBEAT_S": "0.25", "PDSERVE_GROUP": "code"},
    )
    assert cfg.port == 7000 and isinstance(cfg.port, int)
    assert cfg.heartbeat_s == 0.25 and isinstance(cfg.heartbeat_s, float)
    assert cfg.group == "code"
    assert cfg.registry_ttl_s == ServiceConfig.registry_ttl_s  # untouched field keeps default


def test_cli_overrides_env() -> None:
    env = {"PDSERVE_PORT": "7000", "PDSERVE_LOG_LEVEL": "DEBUG"}
    cfg = load_config(ServiceConfig, argv=["--port", "7001"], env=env)
    assert cfg.port == 7001  # CLI wins
    assert cfg.log_level == "DEBUG"  # env still applies where the CLI is silent


def test_cli_flag_names_use_dashes() -> None:
    cfg = load_config(
        ServiceConfig, argv=["--registry-ttl-s", "9", "--advertise-host", "10.0.0.1"], env={}
    )
    assert cfg.registry_ttl_s == 9.0
    assert cfg.advertise_host == "10.0.0.1"


def test_unrelated_env_is_ignored() -> None:
    cfg = load_config(ServiceConfig, argv=[], env={"PORT": "1", "PDSERVE_NOT_A_FIELD": "x"})
    assert cfg == ServiceConfig()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
        ("0", False), ("false", False), ("No", False), ("off", False), ("", False),
    ],
)
def test_bool_env_parsing(raw: str, expected: bool) -> None:
    cfg = load_config(WorkerConfig, argv=[], env={"PDSERVE_KV_CHECKSUM": raw})
    assert cfg.kv_checksum is expected


def test_bool_cli_flag_and_negation_override_env() -> None:
    off = load_config(WorkerConfig, argv=["--no-kv-checksum"], env={"PDSERVE_KV_CHECKSUM": "1"})
    assert off.kv_checksum is False
    on = load_config(WorkerConfig, argv=["--kv-checksum"], env={"PDSERVE_KV_CHECKSUM": "0"})
    assert on.kv_checksum is True
    unset = load_config(WorkerConfig, argv=[], env={"PDSERVE_KV_CHECKSUM": "no"})
    assert unset.kv_checksum is False


def test_bad_bool_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_KV_CHECKSUM") as ei:
        load_config(WorkerConfig, argv=[], env={"PDSERVE_KV_CHECKSUM": "maybe"})
    assert "maybe" in str(ei.value)


def test_bad_int_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_PORT") as ei:
        load_config(ServiceConfig, argv=[], env={"PDSERVE_PORT": "eighty"})
    assert "int" in str(ei.value)


def test_bad_float_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="PDSERVE_HEARTBEAT_S"):
        load_config(ServiceConfig, argv=[], env={"PDSERVE_HEARTBEAT_S": "1s"})


def test_bad_cli_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="port") as ei:
        load_config(ServiceConfig, argv=["--port", "x1"], env={})
    assert "x1" in str(ei.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("port", [-1, 65536, 100000])
def test_port_out_of_range_rejected(port: int) -> None:
    with pytest.raises(ConfigError, match="port"):
        ServiceConfig(port=port)


@pytest.mark.parametrize("port", [0, 1, 65535])
def test_port_bounds_accepted(port: int) -> None:
    assert ServiceConfig(port=port).port == port


def test_port_out_of_range_via_env_is_config_error() -> None:
    with pytest.raises(ConfigError, match="port"):
        load_config(ServiceConfig, argv=[], env={"PDSERVE_PORT": "70000"})


@pytest.mark.parametrize(
    ("heartbeat", "ttl"), [(0.0, 3.0), (-1.0, 3.0), (3.0, 3.0), (4.0, 3.0)]
)
def test_heartbeat_must_be_positive_and_below_ttl(heartbeat: float, ttl: float) -> None:
    with pytest.raises(ConfigError, match="heartbeat_s"):
        ServiceConfig(heartbeat_s=heartbeat, registry_ttl_s=ttl)


def test_heartbeat_just_below_ttl_is_fine() -> None:
    cfg = ServiceConfig(heartbeat_s=2.9, registry_ttl_s=3.0)
    assert cfg.heartbeat_s < cfg.registry_ttl_s


def test_nan_heartbeat_rejected() -> None:
    with pytest.raises(ConfigError):
        load_config(ServiceConfig, argv=[], env={"PDSERVE_HEARTBEAT_S": "nan"})


@pytest.mark.parametrize("group", ["", "a:b", "a{b", "{x}"])
def test_bad_group_names_rejected(group: str) -> None:
    with pytest.raises(ConfigError, match="group"):
        ServiceConfig(group=group)


def test_good_group_name_accepted() -> None:
    assert ServiceConfig(group="code-2_x").group == "code-2_x"


def test_configs_are_frozen() -> None:
    cfg = ServiceConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "cfg",
    [
        ServiceConfig(port=1234, group="g1", heartbeat_s=0.5, registry_ttl_s=1.5,
                      advertise_host="h", redis_url="redis://x:1/0"),
        WorkerConfig(slots=7, kv_checksum=False, model="tiny", torch_threads=2, port=99),
        WorkerConfig(kv_checksum=True),
        GatewayConfig(default_max_tokens=12, registry_poll_s=0.25, port=4000),
        KvStoreConfig(capacity_bytes=12345, lease_s=2.5, data_port=5000, sweep_s=0.1),
        ModelConfig(model="/some/dir", cache_dir="/tmp/c", torch_threads=3),
    ],
)
def test_as_env_round_trips(cfg: object) -> None:
    env = as_env(cfg)
    assert all(k.startswith("PDSERVE_") and isinstance(v, str) for k, v in env.items())
    assert len(env) == len(dataclasses.fields(cfg))  # type: ignore[arg-type]
    again = load_config(type(cfg), argv=[], env=env)
    assert again == cfg


def test_as_env_bools_are_0_and_1() -> None:
    assert as_env(WorkerConfig(kv_checksum=False))["PDSERVE_KV_CHECKSUM"] == "0"
    assert as_env(WorkerConfig(kv_checksum=True))["PDSERVE_KV_CHECKSUM"] == "1"


def test_worker_config_has_service_and_model_fields() -> None:
    cfg = load_config(
        WorkerConfig,
        argv=["--slots", "3", "--model", "tiny"],
        env={"PDSERVE_GROUP": "conv", "PDSERVE_TORCH_THREADS": "2"},
    )
    assert (cfg.slots, cfg.model, cfg.group, cfg.torch_threads) == (3, "tiny", "conv", 2)
    assert cfg.kv_checksum is True
    assert isinstance(cfg, ServiceConfig) and isinstance(cfg, ModelConfig)


def test_worker_config_still_validates_service_fields() -> None:
    with pytest.raises(ConfigError, match="group"):
        load_config(WorkerConfig, argv=["--group", "a:b"], env={})


def test_gateway_port_default_is_50051() -> None:
    cfg = load_config(GatewayConfig, argv=[], env={})
    assert cfg.port == 50051
    assert cfg.default_max_tokens == 256
    assert load_config(GatewayConfig, argv=[], env={"PDSERVE_PORT": "0"}).port == 0


def test_gateway_rejects_non_positive_default_max_tokens() -> None:
    with pytest.raises(ConfigError, match="default_max_tokens"):
        load_config(GatewayConfig, argv=["--default-max-tokens", "0"], env={})


def test_kvstore_config_parses_and_validates() -> None:
    cfg = load_config(
        KvStoreConfig, argv=["--lease-s", "7.5"], env={"PDSERVE_CAPACITY_BYTES": "1048576"}
    )
    assert cfg.capacity_bytes == 1 << 20 and cfg.lease_s == 7.5
    assert KvStoreConfig().capacity_bytes == 4 << 30
    with pytest.raises(ConfigError, match="capacity_bytes"):
        load_config(KvStoreConfig, argv=[], env={"PDSERVE_CAPACITY_BYTES": "0"})
    with pytest.raises(ConfigError, match="lease_s"):
        KvStoreConfig(lease_s=-1.0)


def test_advertised_prefers_advertise_host() -> None:
    cfg = ServiceConfig(host="0.0.0.0", advertise_host="svc.local")
    assert cfg.advertised(81) == "svc.local:81"
    assert ServiceConfig(host="127.0.0.1").advertised(82) == "127.0.0.1:82"


def test_resolved_instance_id() -> None:
    assert ServiceConfig(instance_id="fixed").resolved_instance_id("decode") == "fixed"
    assert ServiceConfig().resolved_instance_id("decode").startswith("decode-")
