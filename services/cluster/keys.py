"""Every Redis key and channel pdserve uses, in one place.

Redis Cluster-safe: every key of a scenario group carries the hash tag ``{<group>}``, so
a group's keys share one cluster slot and a multi-key step over them (always a Lua
script, see ``slotoffer`` and ``registry``) runs on one node. The only keys outside a
group are ``GROUPS_KEY`` and ``EPOCH_KEY``, only ever touched by single-key commands.
"""

from __future__ import annotations

GROUPS_KEY = "pdserve:groups"  # SET of group names
EPOCH_KEY = "pdserve:epoch"  # random token; a new one means Redis lost the registry


def _tag(group: str) -> str:
    return f"pdserve:{{{group}}}"


def members_key(group: str) -> str:
    """SET of the group's instance ids."""
    return f"{_tag(group)}:members"


def instance_key(group: str, instance_id: str) -> str:
    """JSON InstanceInfo with a TTL (the instance's lease)."""
    return f"{_tag(group)}:inst:{instance_id}"


def queue_key(group: str) -> str:
    """ZSET rejection-forwarding queue: "<request>|<gateway>" scored by deadline (unix ms),
    so ties order by request id as ``scheduling.queue_order`` does."""
    return f"{_tag(group)}:fwdq"


def offered_key(group: str) -> str:
    """HASH queue member -> unix ms until which a freed slot offered to it is its own."""
    return f"{_tag(group)}:offered"


def free_key(group: str) -> str:
    """ZSET prefill id -> unix ms it freed a slot that no waiter took (closes the race of a
    slot that frees between a request's last rejection and its entry into the queue)."""
    return f"{_tag(group)}:free"


def gateways_key(group: str) -> str:
    """HASH gateway id -> unix ms until which its queue entries count as alive."""
    return f"{_tag(group)}:gateways"


def wake_channel_prefix(group: str) -> str:
    """Pub/sub ``<prefix><gateway>``: a freed slot offered to one of that gateway's waiters."""
    return f"{_tag(group)}:wake:"


def wake_pattern(gateway_id: str) -> str:
    """PSUBSCRIBE pattern for every group's offers to ``gateway_id``."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in gateway_id)
    return f"pdserve:{{*}}:wake:{escaped}"


def queue_state_channel(group: str) -> str:
    """Pub/sub: "1" when the group's forwarding queue turns non-empty, "0" when empty."""
    return f"{_tag(group)}:qstate"


QUEUE_STATE_PATTERN = "pdserve:{*}:qstate"


def group_of_channel(channel: str) -> str:
    return channel[channel.index("{") + 1 : channel.index("}")]
