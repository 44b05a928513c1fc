"""The discrete-event simulator of a pdserve cluster: ``bench.sim`` (kept importable here).

``bench/sim/core.py`` has the model and the list of live policy functions it drives,
``bench/sim/fleet.py`` the fleet-scale runner (10,000 instances, parallel groups), and
``bench/sim/calibrate.py`` the observe -> replay -> calibrate loop against the live mock
cluster. See docs/simulator.md.
"""

from __future__ import annotations

from bench.sim.core import POLICY_CORE, SIM_POLICIES, Simulator
from bench.sim.model import LOP_QUEUE, Result, SimConfig, SimRequest, Stats

__all__ = ["LOP_QUEUE", "POLICY_CORE", "SIM_POLICIES", "Result", "SimConfig", "SimRequest",
           "Simulator", "Stats"]
