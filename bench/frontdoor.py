"""Front-door bench: the stack's own per-request cost, with an engine that costs nothing.

A `pdserve up --engine mock` cluster (1 prefill + 1 decode, ``bench/profiles/instant.json``:
every modelled latency is 0, the KV bytes still move over the real transport) is driven
by a grpc.aio client in this process at concurrency c = 1, 8, 32 with 1 and 64 new
tokens. For each cell: req/s, client TTFT p50/p99 (send -> first token), and CPU seconds
per request of every process (client, gateway, prefill, decode, kvstore, redis), read
from /proc before and after the cell.

Baselines measured in the same run:
  --baseline-tree DIR   the same cells against a cluster started from another source
                        tree (e.g. `git archive <commit> | tar -x -C DIR`): before/after.
  --dynamo              Dynamo 1.6.1's Rust frontend + mocker (disagg), if it is
                        installed (bench/frontdoor_dynamo.py says how); started and
                        stopped by PID.
Ratios printed are this tree over the baseline.

  python bench/frontdoor.py [--quick] [--runs 3] [--slots 4] [--cells 1x1,8x64]
         [--baseline-tree DIR] [--trace PATH] [--json FILE] [--py-spy DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, stop_up  # noqa: E402

PROFILE = ROOT / "bench" / "profiles" / "instant.json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
DYNAMO_8X64_REQ_S = 255.2  # Dynamo disagg at c=8 x 64, measured on a quiet box of this kind
FULL_CELLS = "1x1,8x1,32x1,1x64,8x64,32x64"
QUICK_CELLS = "1x1,8x64"


@dataclass
class Cell:
    concurrency: int
    new_tokens: int
    requests: int
    req_s: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    ttft_max_ms: float = 0.0
    errors: int = 0
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)
    ttft_ms: list[float] = field(default_factory=list)


class Cluster:
    """`pdserve up` from ``tree`` (this repo by default), owned by PID."""

    def __init__(self, tree: Path, slots: int, env: dict[str, str],
                 profile: Path = PROFILE) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pdserve-frontdoor-"))
        self.out = open(self.dir / "up.out", "w+b")
        args = [sys.executable, "-m", "services.cli", "up", "--engine", "mock", "--profile",
                str(profile), "--prefill", "1", "--decode", "1", "--port", str(self.port),
                "--log-dir", str(self.dir)]
        if slots:
            args += ["--slots", str(slots)]
        pypath = os.pathsep.join([str(tree), str(tree / "gen")])
        if "--http-port" in (tree / "services" / "cli.py").read_text():
            args += ["--http-port", "0"]  # the HTTP door on any free port
        self.proc = subprocess.Popen(args, cwd=tree, stdout=self.out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env, "PYTHONPATH": pypath})
        self.address = f"127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 120) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited: {self.log()}")
            if b"gateway listening" in (self.dir / "up.out").read_bytes() and self._serving():
                return
            time.sleep(0.2)
        raise TimeoutError(f"cluster not up: {self.log()}")

    def _serving(self) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.address) as ch:
            try:
                st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=2)
            except grpc.RpcError:
                return False
        return bool(st.status == health_pb2.HealthCheckResponse.SERVING)

    def log(self) -> str:
        return (self.dir / "up.out").read_text(errors="replace")[-3000:]

    def processes(self) -> dict[str, int]:
        """name -> pid of every child of `pdserve up` (workers and redis-server)."""
        out: dict[str, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) != self.proc.pid:
                    continue
                cmd = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            name = Path(cmd[0].decode().split(" ")[0]).name  # redis-server retitles itself
            if b"-m" in cmd:
                name = cmd[cmd.index(b"-m") + 1].decode().removeprefix("services.")
            out[name] = int(stat.parent.name)
        return out

    def stop(self) -> None:
        stop_up(self.proc)
        self.out.close()


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


async def drive_times(address: str, c: int, n: int, prompts: list[list[int]], new_tokens: int
                      ) -> tuple[float, list[tuple[float, list[float]]], int]:
    """n requests by c concurrent streams on one channel: wall time, and for each request
    that got all its tokens, its send time and the arrival time of each token message
    (perf_counter); and the errors."""
    import grpc

    from pdserve.v1 import generation_service_pb2 as pb
    from pdserve.v1 import generation_service_pb2_grpc as pb_grpc

    done: list[tuple[float, list[float]]] = []
    errors = 0
    next_i = iter(range(n))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)

        async def user() -> None:
            nonlocal errors
            for i in next_i:
                req = pb.GenerateRequest(prompt_token_ids=prompts[i % len(prompts)],
                                         max_tokens=new_tokens)
                t0 = time.perf_counter()
                times: list[float] = []
                got = 0
                try:
                    async for msg in stub.Generate(req, timeout=60):
                        if msg.token_ids:
                            times.append(time.perf_counter())
                        got += len(msg.token_ids)
                except grpc.aio.AioRpcError as e:
                    errors += 1
                    if errors == 1:
                        print(f"  first error: {e.code().name} {e.details()}", flush=True)
                    continue
                if not times or got != new_tokens:
                    errors += 1
                    if errors == 1:
                        print(f"  first error: {got} of {new_tokens} tokens", flush=True)
                    continue
                done.append((t0, times))

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(c)))
        return time.perf_counter() - t0, done, errors


async def drive(address: str, c: int, n: int, prompts: list[list[int]],
                new_tokens: int) -> tuple[float, list[float], int]:
    """n requests by c concurrent streams on one channel; wall time, TTFTs (ms), errors."""
    wall, done, errors = await drive_times(address, c, n, prompts, new_tokens)
    return wall, [(times[0] - t0) * 1e3 for t0, times in done], errors


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def start_py_spy(procs: dict[str, int], out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (dev extra) on every pdserve process, collapsed stacks, until SIGINT."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([spy, "record", "--format", "raw", "--rate", "100", "--idle",
                              "--nonblocking", "-o", str(out_dir / f"{name}.txt"), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in procs.items() if name not in ("redis-server", "client")]


def stop_py_spy(spies: list[subprocess.Popen[bytes]]) -> None:
    for p in spies:
        p.send_signal(signal.SIGINT)
    for p in spies:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


Driver = Callable[[int, int, int], tuple[float, list[float], int]]  # c, n, tokens


def run_cells(drive_fn: Driver, procs: dict[str, int], cells: list[tuple[int, int]],
              n_of: dict[int, int], py_spy: str = "") -> list[Cell]:
    drive_fn(4, 40, 8)  # warm channels and caches
    procs = {**procs, "client": os.getpid()}
    spies = start_py_spy(procs, Path(py_spy)) if py_spy else []
    try:
        return _cells(drive_fn, procs, cells, n_of)
    finally:
        stop_py_spy(spies)


def _cells(drive_fn: Driver, procs: dict[str, int], cells: list[tuple[int, int]],
           n_of: dict[int, int]) -> list[Cell]:
    out = []
    for c, k in cells:
        n = n_of[c]
        before = {name: cpu_s(pid) for name, pid in procs.items()}
        wall, ttfts, errors = drive_fn(c, n, k)
        cell = Cell(c, k, n, req_s=(n - errors) / wall, ttft_p50_ms=pct(ttfts, 0.5),
                    ttft_p99_ms=pct(ttfts, 0.99), ttft_max_ms=max(ttfts, default=float("nan")),
                    errors=errors, ttft_ms=[round(t, 3) for t in ttfts])
        cell.cpu_ms_per_req = {name: 1e3 * (cpu_s(pid) - before[name]) / n
                               for name, pid in procs.items()}
        out.append(cell)
        print(f"  c={c:<3} tokens={k:<3} {cell.req_s:7.1f} req/s  TTFT p50 "
              f"{cell.ttft_p50_ms:6.1f} p99 {cell.ttft_p99_ms:6.1f} ms  errors {errors}  "
              f"cpu ms/req " + " ".join(f"{a}={v:.2f}" for a, v in
                                        sorted(cell.cpu_ms_per_req.items())), flush=True)
    return out


def prompt_set(args: argparse.Namespace) -> list[list[int]]:
    """Fresh prompts (no prefix-cache hits between requests), ``--prompt-tokens`` long, or
    the trace's prompt lengths when ``--trace`` is given (capped at 2k)."""
    import random

    rng = random.Random(7)
    lens = [args.prompt_tokens] * 512
    if args.trace:
        from bench.traces import load_trace

        lens = [min(2048, max(1, r.prompt_len)) for r in load_trace(args.trace)[:512]]
    return [[rng.randrange(16, 49152) for _ in range(n)] for n in lens]


def summarize(runs: list[list[Cell]]) -> list[dict[str, object]]:
    """Median over runs per cell, with min/max spread."""
    rows = []
    for cells in zip(*runs, strict=True):
        row: dict[str, object] = {"c": cells[0].concurrency, "tokens": cells[0].new_tokens}
        for key in ("req_s", "ttft_p50_ms", "ttft_p99_ms"):
            vals = [getattr(x, key) for x in cells]
            row[key] = statistics.median(vals)
            row[key + "_spread"] = [min(vals), max(vals)]
        names = cells[0].cpu_ms_per_req.keys()
        row["cpu_ms_per_req"] = {a: statistics.median(x.cpu_ms_per_req[a] for x in cells)
                                 for a in names}
        row["errors"] = sum(x.errors for x in cells)
        rows.append(row)
    return rows


def ttft_lists(runs: list[list[Cell]]) -> dict[str, list[list[float]]]:
    """Every client TTFT (ms) per cell and run, for distributions."""
    return {f"{cs[0].concurrency}x{cs[0].new_tokens}": [c.ttft_ms for c in cs]
            for cs in zip(*runs, strict=True)}


def measure(trees: dict[str, Path], args: argparse.Namespace, cells: list[tuple[int, int]],
            n_of: dict[int, int], prompts: list[list[int]]) -> dict[str, list[list[Cell]]]:
    """Runs alternate between the systems, so machine noise hits each of them alike."""
    runs: dict[str, list[list[Cell]]] = {label: [] for label in trees}
    if args.dynamo_python:
        from bench.frontdoor_dynamo import text_prompts

        runs["dynamo"] = []
        texts = text_prompts(args.prompt_tokens)
    for r in range(args.runs):
        for label, tree in trees.items():
            print(f"[{label}] run {r + 1}/{args.runs}", flush=True)
            cluster = Cluster(tree, args.slots, {})
            try:
                cluster.wait()
                spy = f"{args.py_spy}/{label}-run{r + 1}" if args.py_spy else ""

                def grpc_drive(c: int, n: int, k: int, addr: str = cluster.address
                               ) -> tuple[float, list[float], int]:
                    return asyncio.run(drive(addr, c, n, prompts, k))

                runs[label].append(run_cells(grpc_drive, cluster.processes(), cells, n_of,
                                             spy))
            finally:
                cluster.stop()
        if args.dynamo_python:
            from bench.frontdoor_dynamo import Dynamo, drive_http

            print(f"[dynamo] run {r + 1}/{args.runs}", flush=True)
            dyn = Dynamo(args.dynamo_python)
            try:
                dyn.wait()

                def http_drive(c: int, n: int, k: int, url: str = dyn.url
                               ) -> tuple[float, list[float], int]:
                    return asyncio.run(drive_http(url, c, n, texts, k))

                runs["dynamo"].append(run_cells(http_drive, dyn.pids(), cells, n_of))
            finally:
                dyn.stop()
    return runs


def plot_cdfs(result: dict[str, object], path: str, slots: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(result["this_ttft_ms"])  # type: ignore[call-overload]
    cols = min(3, len(cells))
    rows = -(-len(cells) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False)
    for ax, cell in zip(axes.flat, cells, strict=False):
        for label, style in (("baseline", "--"), ("dynamo", ":"), ("this", "-")):
            runs = result.get(f"{label}_ttft_ms", {}).get(cell)  # type: ignore[attr-defined]
            if not runs:
                continue
            xs = sorted(t for run in runs for t in run)
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], style, label=label)
        c, k = cell.split("x")
        ax.set_title(f"c={c}, {k} token(s), {slots} slots")
        ax.set_xscale("log")
        ax.set_xlabel("client TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(label: str, rows: object, procs: tuple[str, ...]) -> None:
    print(f"\n[{label}]\n| c x tokens | req/s | TTFT p50 ms | TTFT p99 ms | cpu ms/req "
          f"({'/'.join(procs)}) |\n|---|---|---|---|---|")
    for row in rows:  # type: ignore[attr-defined]
        cpu = row["cpu_ms_per_req"]
        print(f"| {row['c']}x{row['tokens']} | {row['req_s']:.0f} "
              f"[{row['req_s_spread'][0]:.0f}-{row['req_s_spread'][1]:.0f}] | "
              f"{row['ttft_p50_ms']:.1f} [{row['ttft_p50_ms_spread'][0]:.1f}-"
              f"{row['ttft_p50_ms_spread'][1]:.1f}] | {row['ttft_p99_ms']:.1f} "
              f"[{row['ttft_p99_ms_spread'][0]:.1f}-{row['ttft_p99_ms_spread'][1]:.1f}] | "
              + "/".join(f"{cpu.get(k, 0):.2f}" for k in procs) + " |")


def targets(result: dict[str, object]) -> None:
    """The targets: Dynamo's req/s at c=8 x 64 tokens (same run when measured, else
    the figure measured on a quiet box) and TTFT p50 <= 3 ms at c=1 (1 token)."""
    rows = {(r["c"], r["tokens"]): r for r in result["this"]}  # type: ignore[attr-defined]
    dyn = {(r["c"], r["tokens"]): r for r in result.get("dynamo", [])}  # type: ignore[attr-defined]
    if (8, 64) in rows:
        ref, src = ((dyn[(8, 64)]["req_s"], "same run") if (8, 64) in dyn
                    else (DYNAMO_8X64_REQ_S, "a quiet box, not this run"))
        got = rows[(8, 64)]["req_s"]
        print(f"target c=8x64 req/s >= Dynamo's: {got:.0f} vs {ref:.0f} ({src}): "
              f"{'met' if got >= ref else 'NOT met'} ({got / ref:.2f}x)")
    if (1, 1) in rows:
        got = rows[(1, 1)]["ttft_p50_ms"]
        print(f"target c=1 TTFT p50 <= 3 ms: {got:.1f} ms: {'met' if got <= 3 else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="c=1x1 and c=8x64, fewer requests")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slots", type=int, default=4, help="prefill slots b_p (4 = default)")
    ap.add_argument("--cells", default="", help=f"CxTOKENS list (default {FULL_CELLS})")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--baseline-tree", default="", help="another source tree to compare")
    ap.add_argument("--trace", default="", help="take prompt lengths from this trace")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--dynamo-python", default="", help="python of a venv with Dynamo 1.6.1 "
                    "(bench/frontdoor_dynamo.py): measure its disagg frontend + mockers too")
    ap.add_argument("--plot", default="", help="PNG: client TTFT CDF per cell, this tree "
                    "against the baseline (all runs pooled)")
    ap.add_argument("--py-spy", default="", help="record each process's stacks into this dir "
                    "(collapsed; needs py-spy from the dev extra, and ptrace rights)")
    args = ap.parse_args()
    if args.quick:
        args.runs = min(args.runs, 1)
    spec = args.cells or (QUICK_CELLS if args.quick else FULL_CELLS)
    cells = [(int(a), int(b)) for a, b in (p.split("x") for p in spec.split(","))]
    scale = 0.25 if args.quick else 1.0
    n_of = {c: max(20, int(scale * {1: 100, 8: 200, 32: 320}.get(c, 10 * c))) for c, _ in cells}
    prompts = prompt_set(args)

    result: dict[str, object] = {"slots": args.slots, "prompt_tokens": args.prompt_tokens,
                                 "profile": str(PROFILE.relative_to(ROOT))}
    trees = {"this": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    runs = measure(trees, args, cells, n_of, prompts)
    for label, label_runs in runs.items():
        result[label] = summarize(label_runs)
        result[f"{label}_ttft_ms"] = ttft_lists(label_runs)

    print(f"\nFront door, instant mock profile, 1 prefill ({args.slots} slots) + 1 decode, "
          f"{args.prompt_tokens}-token prompts, {args.runs} run(s); median [min-max]")
    for label in runs:
        print_table(label, result[label], ("gateway", "prefill", "decode", "kvstore",
                                           "redis-server", "client")
                    if label != "dynamo" else ("dynamo-frontend", "dynamo-prefill",
                                               "dynamo-decode", "client"))
    for other in ("baseline", "dynamo"):
        if other in runs:
            print(f"\nthis / {other}: req/s ratio, TTFT p50 ratio")
            for row, b in zip(result["this"], result[other], strict=True):  # type: ignore[call-overload]
                print(f"  {row['c']}x{row['tokens']}: req/s {row['req_s'] / b['req_s']:.2f}x "
                      f"({row['req_s']:.0f} vs {b['req_s']:.0f}), TTFT p50 "
                      f"{row['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x "
                      f"({row['ttft_p50_ms']:.1f} vs {b['ttft_p50_ms']:.1f} ms)")
    targets(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=asdict))
    if args.plot:
        plot_cdfs(result, args.plot, args.slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
