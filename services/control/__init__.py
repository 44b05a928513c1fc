"""The fleet control plane's brain (P/D-Serve §1.1, §1.3): the E2E performance model
(``perfmodel``), the online per-group ratio controller (``controller``), the actuator
interface and idempotent plans it acts through (``actuator``), and the Redis lease that
lets exactly one controller act at a time (``leader``). Everything but ``leader`` is
pure: no I/O, no clock, so the live cluster and the simulator run the same code."""
