"""The cluster's shared state in Redis: the instance registry (leases, heartbeats, the
polled view), every key name, the forwarding queue's atomic steps (slot offers), and the
private redis-server of ``pdserve up`` and the tests."""
