"""services.cluster.registry: InstanceInfo serialization and the Redis key layout."""

from __future__ import annotations

import json

import pytest

from services.cluster.registry import GROUPS_KEY, InstanceInfo, instance_key, members_key

pytestmark = pytest.mark.unit


def _hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes (the first non-empty {...})."""
    start = key.find("{")
    if start == -1:
        return key
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return key
    return key[start + 1 : end]


def test_instance_info_round_trip_preserves_tuples() -> None:
    info = InstanceInfo(
        instance_id="decode-0", role="decode", group="code", address="10.0.0.2:5000",
        data_address="10.0.0.2:5001", transports=("tcp", "shm"), slots=8,
        model_fingerprint="f" * 64, host_id="host-a", started_unix=1700000000.25,
        load={"busy": 0.5, "open_streams": 3.0},
    )
    raw = info.to_json()
    assert "\n" not in raw and ": " not in raw  # compact
    back = InstanceInfo.from_json(raw)
    assert back == info
    assert isinstance(back.transports, tuple)
    assert InstanceInfo.from_json(raw.encode()) == info


def test_instance_info_defaults_round_trip() -> None:
    info = InstanceInfo(instance_id="g", role="gateway", group="default", address="h:1")
    back = InstanceInfo.from_json(info.to_json())
    assert back == info and back.transports == () and back.load == {}


def test_from_json_tolerates_missing_transports() -> None:
    d = json.loads(InstanceInfo("p", "prefill", "g", "h:1", transports=("tcp",)).to_json())
    del d["transports"]
    back = InstanceInfo.from_json(json.dumps(d))
    assert back.transports == ()
    assert back.instance_id == "p" and back.role == "prefill"


def test_instance_info_equality_includes_load() -> None:
    a = InstanceInfo("x", "decode", "g", "h:1", load={"busy": 1.0})
    b = InstanceInfo("x", "decode", "g", "h:1", load={"busy": 2.0})
    assert a != b


@pytest.mark.parametrize("group", ["default", "code", "conv-2"])
def test_group_keys_share_one_hash_tag(group: str) -> None:
    m = members_key(group)
    keys = [m, instance_key(group, "decode-0"), instance_key(group, "x{y}z")]
    assert {_hash_tag(k) for k in keys} == {group}
    assert m == f"pdserve:{{{group}}}:members"
    assert instance_key(group, "decode-0") == f"pdserve:{{{group}}}:inst:decode-0"


def test_different_groups_get_different_tags_and_keys() -> None:
    assert _hash_tag(members_key("a")) != _hash_tag(members_key("b"))
    assert instance_key("a", "i") != instance_key("b", "i")
    assert members_key("a") != instance_key("a", "members")
    assert GROUPS_KEY == "pdserve:groups" and "{" not in GROUPS_KEY
