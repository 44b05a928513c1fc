"""The fleet control plane (P/D-Serve §1.1, §1.3). Pure, shared by the live cluster and
the simulator: the E2E performance model (``perfmodel``), the per-group ratio controller
(``controller``), decisions and idempotent plans and the ``Actuator`` protocol
(``actuator``). With I/O: the plan executor (``executor``), the Redis lease with fencing
that lets exactly one controller act (``leader``), the live loop hosted by the gateways
(``loop``), ``pdserve plan`` (``plan_cli``), and the actuators for role-switchable
workers and Kubernetes (``actuators_local``, ``actuators_k8s``)."""
