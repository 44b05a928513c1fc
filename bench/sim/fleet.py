"""Fleet-scale runs: many scenario groups replaying a compressed trace, in parallel processes.

Groups are isolated (a request, its KV and its instances stay in one group), so a run
splits them over ``workers`` processes (group ``g`` to worker ``g % workers``), each
simulating its groups with the full model of ``bench.sim.core``, ``chunk_groups`` at a
time, and adds the ``Stats``. A controller that moves instances *between* groups sees
the groups of one chunk (``--workers 1 --chunk-groups 0``: all of them).

The result is independent of ``workers``: every per-group input (arrivals, tie-break
ticks, RNG) depends only on the group (``tests/unit/test_sim_invariants.py`` checks a
run on 1 and 2 workers gives identical figures).
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.sim import hook
from bench.sim.arrivals import compress_for, group_stream
from bench.sim.core import Simulator
from bench.sim.model import SimConfig, Stats
from bench.traces import TraceRequest, load_trace
from services.engine.mock import LatencyModel
from services.model.profile import profile_path


@dataclass(frozen=True)
class FleetSpec:
    cfg: SimConfig
    trace: str  # path
    duration_ms: float
    compress: float = 0.0  # 0: from ``utilisation``
    utilisation: float = 0.6  # target prefill utilisation the trace's rate is compressed to
    max_prompt: int = 16384
    profile: str = "scaled-gpu"
    workers: int = 2
    control: str = ""  # MODULE:FACTORY of a hook.Control, built in each worker
    # Hot groups: every ``hot_every``-th group (0: none) gets ``hot_factor`` times the rate.
    hot_every: int = 0
    hot_factor: float = 1.0
    # A worker simulates its groups this many at a time, one chunk after another: groups
    # are isolated, so the result is the same, and the event heap and working set stay
    # those of one chunk whatever the fleet size. One group at a time is the fastest: a
    # group's prefix caches (12 x 1,024 blocks) stay in the CPU's caches (Mooncake, 300 s:
    # 38 us of CPU per request with 16 groups a chunk, 30 us with 1). A controller that
    # moves instances between groups sees one chunk (``CONTROL_CHUNK_GROUPS`` with
    # ``--control``); 0 = all of the worker's groups at once.
    chunk_groups: int = 1

    @property
    def instances(self) -> int:
        return self.cfg.groups * (self.cfg.prefills_per_group + self.cfg.decodes_per_group)


# The chunk a controller sees when the command line does not say (bench/sim_fleet.py).
CONTROL_CHUNK_GROUPS = 16


@dataclass
class FleetResult:
    spec: dict[str, object]
    stats: dict[str, float]
    compress: float
    wall_s: float
    cpu_s: float  # summed over workers
    max_rss_mb: float  # the largest worker's peak resident memory
    workers: int

    @property
    def requests_per_s(self) -> float:
        return float(self.stats["requests"]) / self.wall_s if self.wall_s else 0.0

    @property
    def events_per_s(self) -> float:
        return float(self.stats["events"]) / self.wall_s if self.wall_s else 0.0


def latency_of(profile: str) -> LatencyModel:
    return LatencyModel.from_profile(json.loads(profile_path(profile).read_text()))


_TRACES: dict[str, list[TraceRequest]] = {}


def _trace(path: str) -> list[TraceRequest]:
    if path not in _TRACES:
        _TRACES[path] = load_trace(path)
    return _TRACES[path]


def run_groups(spec: FleetSpec, group_ids: list[int], compress: float,
               audit: bool = False) -> tuple[Stats, float, float, Simulator]:
    """Simulate ``group_ids`` in this process: (stats, wall s, cpu s, the simulator)."""
    lat = latency_of(spec.profile)
    trace = _trace(spec.trace)
    control = hook.load_control(spec.control) if spec.control else None
    sim = Simulator(spec.cfg, lat, group_ids=group_ids, control=control, keep_results=False,
                    audit=audit)
    for g in group_ids:
        hot = spec.hot_every > 0 and g % spec.hot_every == 0
        sim.add_source(group_stream(trace, g, compress * (spec.hot_factor if hot else 1.0),
                                    spec.duration_ms, spec.max_prompt))
    sim.window(spec.duration_ms)
    t0, c0 = time.perf_counter(), time.process_time()
    sim.loop()
    return sim.stats, time.perf_counter() - t0, time.process_time() - c0, sim


def _worker(args: tuple[FleetSpec, list[int], float]) -> tuple[Stats, float, float, float]:
    spec, groups, compress = args
    k = spec.chunk_groups if spec.chunk_groups > 0 else len(groups)
    stats, wall, cpu = Stats(), 0.0, 0.0
    # The trace and the modules stay for the whole run: out of the cyclic collector's way
    # (its full passes walked them for every chunk). A chunk's pools and groups refer to
    # each other, so they are collected once the chunk is done.
    _trace(spec.trace)
    gc.freeze()
    try:
        for i in range(0, len(groups), k):
            st, w, c, sim = run_groups(spec, groups[i:i + k], compress)
            del sim
            gc.collect()
            stats.merge(st)
            wall += w
            cpu += c
    finally:
        gc.unfreeze()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return stats, wall, cpu, rss_mb


def compress_of(spec: FleetSpec) -> float:
    if spec.compress > 0:
        return spec.compress
    return compress_for(_trace(spec.trace), spec.cfg, latency_of(spec.profile),
                        spec.utilisation, spec.max_prompt)


def run_fleet(spec: FleetSpec) -> FleetResult:
    compress = compress_of(spec)
    workers = max(1, min(spec.workers, spec.cfg.groups))
    shards = [[g for g in range(spec.cfg.groups) if g % workers == k] for k in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        outs = [_worker((spec, shards[0], compress))]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            outs = pool.map(_worker, [(spec, s, compress) for s in shards])
    wall = time.perf_counter() - t0
    total = Stats()
    for st, _, _, _ in outs:
        total.merge(st)
    d = asdict(spec)
    d["cfg"] = asdict(spec.cfg)
    return FleetResult(d, total.summary(), compress, wall, sum(o[2] for o in outs),
                       max(o[3] for o in outs), workers)


def shape(spec: str) -> tuple[int, int]:
    """'12p4d' -> (12, 4)."""
    s = spec.lower().removesuffix("d")
    p, _, d = s.partition("p")
    if not (p.isdigit() and d.isdigit()) or int(p) < 1 or int(d) < 1:
        raise ValueError(f"bad group shape {spec!r}; expected <N>p<M>d, e.g. 12p4d")
    return int(p), int(d)


def groups_for(instances: int, n_p: int, n_d: int) -> int:
    return max(1, round(instances / (n_p + n_d)))


def with_groups(spec: FleetSpec, groups: int) -> FleetSpec:
    return replace(spec, cfg=replace(spec.cfg, groups=groups))


def save(results: list[FleetResult], path: Path) -> None:
    path.write_text(json.dumps([{**asdict(r), "requests_per_s": r.requests_per_s,
                                 "events_per_s": r.events_per_s} for r in results], indent=2))
