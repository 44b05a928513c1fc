"""Every Redis key and channel pdserve uses, in one place. One hash tag per
scenario group, so a group's keys share a cluster slot and can change atomically."""

from __future__ import annotations

GROUPS_KEY = "pdserve:groups"  # SET of group names


def members_key(group: str) -> str:
    """SET of the group's instance ids."""
    return f"pdserve:{{{group}}}:members"


def instance_key(group: str, instance_id: str) -> str:
    """JSON InstanceInfo with a TTL (the instance's lease)."""
    return f"pdserve:{{{group}}}:inst:{instance_id}"


def queue_key(group: str) -> str:
    """ZSET rejection-forwarding queue: "<gateway>|<request>" scored by deadline (unix ms)."""
    return f"pdserve:{{{group}}}:fwdq"


def slotfree_channel(group: str) -> str:
    """Pub/sub: a prefill publishes its id when it frees a batch slot."""
    return f"pdserve:{{{group}}}:slotfree"


SLOTFREE_PATTERN = "pdserve:{*}:slotfree"


def group_of_channel(channel: str) -> str:
    return channel[channel.index("{") + 1 : channel.index("}")]
