"""The ``pdserve`` command.

  pdserve up [--prefill N] [--decode M] [--model M] [--port P]   whole cluster, one machine
  pdserve serve <gateway|prefill|decode|kvstore> [flags]          one service (compose, k8s)
  pdserve generate "prompt" [--max-tokens N] ...                  stream from a gateway
  pdserve model prepare [--model M]                               convert/cache a model once
  pdserve status [--redis-url URL]                                registry: groups and members
  pdserve serve device --cloud-address A; pdserve device chat|profile  P/D-Device
  pdserve plan --trace T | --group NAME:prompt=P,output=O,rate=R     Eq. 1 ratio per group
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

ROLES = ("gateway", "prefill", "decode", "kvstore", "device")


def _up(args: argparse.Namespace) -> int:
    from services.launcher import UpOptions, run_up

    model = f"mock:{args.profile}" if args.engine == "mock" else args.model
    env = {"PDSERVE_SCHEDULER": args.scheduler}
    if args.scheduler == "reported-queue":
        env["PDSERVE_HEARTBEAT_S"] = "0.1"  # load reports every 100 ms, as in the paper
        env["PDSERVE_REGISTRY_POLL_S"] = "0.1"
    return run_up(UpOptions(
        prefill=args.prefill, decode=args.decode, model=model, host=args.host,
        port=args.port, log_dir=args.log_dir, groups=args.groups or "", extra_env=env,
        prefill_slots=args.slots))


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"services.{args.role}.main")
    module.main(rest)
    return 0


async def _generate(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.v1 import common_pb2, generation_service_pb2, generation_service_pb2_grpc
    from services.common.errors import error_info

    req = generation_service_pb2.GenerateRequest(
        prompt=args.prompt, temperature=args.temperature, stop=args.stop or [],
        scenario=args.scenario, use_chat_template=not args.raw,
        ttft_deadline_ms=args.ttft_deadline_ms)
    if args.max_tokens is not None:
        req.max_tokens = args.max_tokens
    if args.top_p is not None:
        req.top_p = args.top_p
    if args.seed is not None:
        req.seed = args.seed
    t0 = time.monotonic()
    first_at = None
    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        try:
            async for msg in stub.Generate(req, timeout=args.timeout):
                if msg.token_ids and first_at is None:
                    first_at = time.monotonic()
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.finish_reason:
                    t = msg.timings
                    reason = common_pb2.FinishReason.Name(msg.finish_reason)
                    print(f"\n\n[{reason.removeprefix('FINISH_REASON_').lower()}] "
                          f"ttft {t.ttft_ms:.0f} ms (client {1e3 * ((first_at or t0) - t0):.0f} ms)"
                          f" | tpot mean {t.mean_tpot_ms:.1f} ms, max {t.max_tpot_ms:.1f} ms | "
                          f"prefill {t.prefill_ms:.0f} ms, kv transfer {t.kv_transfer_ms:.1f} ms"
                          f" ({t.kv_transport}) | e2e {t.e2e_ms:.0f} ms", file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            reason = f" [{info.reason}]" if info else ""
            print(f"\nerror: {e.code().name}{reason}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo

    ensure_prepared(args.model)
    info = ModelInfo.load(args.model)
    print(f"{info.name}: {info.path}")
    return 0


async def _status(args: argparse.Namespace) -> int:
    from services.common.config import env_str
    from services.common.registry import connect, list_instances

    url = args.redis_url or env_str("REDIS_URL")
    if not url:
        print("error: pass --redis-url or set PDSERVE_REDIS_URL (pdserve up prints it)",
              file=sys.stderr)
        return 2
    client = connect(url)
    try:
        instances = await list_instances(client)
    finally:
        await client.aclose()
    by_group: dict[str, list[str]] = {}
    for i in instances:
        load = " ".join(f"{k}={v:g}" for k, v in sorted(i.load.items()))
        by_group.setdefault(i.group, []).append(f"  {i.role:8} {i.instance_id:28} {i.address:22} "
                                                f"slots={i.slots} {load}")
    for g in sorted(by_group):
        print(f"group {g}:")
        print("\n".join(sorted(by_group[g])))
    if not by_group:
        print("no live instances")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving.")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="run the whole cluster locally")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument("--groups", help="scenario groups, e.g. code:2p1d,conv:3p2d")
    up.add_argument("--model", default="smollm2", help="smollm2, tiny, or a checkpoint dir")
    up.add_argument("--engine", choices=("torch", "mock"), default="torch",
                    help="mock: workers take the time a latency profile says (no torch)")
    up.add_argument("--profile", default="smollm2-cpu",
                    help="mock engine profile: built-in name or a .json path")
    up.add_argument("--scheduler", default="forward",
                    help="forward | rr-queue | los-queue | reported-queue")
    up.add_argument("--slots", type=int, default=0, help="prefill batch slots b_p (0: default)")
    up.add_argument("--host", default="127.0.0.1", help="gateway bind address")
    up.add_argument("--port", type=int, default=50051, help="gateway port")
    up.add_argument("--log-dir", default="", help="per-process logs (default: a temp dir)")

    serve = sub.add_parser("serve", help="run one service (flags: see --help of the role)",
                           add_help=False)
    serve.add_argument("role", choices=ROLES)

    gen = sub.add_parser("generate", help="stream a completion from a gateway")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append")
    gen.add_argument("--scenario", default="")
    gen.add_argument("--ttft-deadline-ms", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="no chat template")
    gen.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline, seconds")

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    prep = msub.add_parser("prepare", help="convert and cache a built-in model")
    prep.add_argument("--model", default="smollm2")

    st = sub.add_parser("status", help="list scenario groups and live instances")
    st.add_argument("--redis-url", default="")

    from services.device.cli import add_parser as add_device_parser

    add_device_parser(sub)
    from services.control.plan_cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.cmd != "serve" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "up":
        code = _up(args)
    elif args.cmd == "serve":
        code = _serve(args, rest)
    elif args.cmd == "generate":
        code = asyncio.run(_generate(args))
    elif args.cmd == "model":
        code = _prepare(args)
    elif args.cmd == "device":
        from services.device.cli import run as run_device

        code = run_device(args)
    elif args.cmd == "plan":
        from services.control.plan_cli import run as run_plan

        code = run_plan(args)
    else:
        code = asyncio.run(_status(args))
    sys.exit(code)


if __name__ == "__main__":
    main()
