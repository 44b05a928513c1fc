"""The ``pdserve`` command.

  pdserve up [--prefill N] [--decode M] [--model M] [--port P]   whole cluster, one machine
  pdserve serve <gateway|prefill|decode|kvstore> [flags]          one service (compose, k8s)
  pdserve generate "prompt" [--max-tokens N] ...                  stream from a gateway
  pdserve model prepare [--model M]                               convert/cache a model once
  pdserve status [--redis-url URL]                                registry: groups and members
  pdserve serve device --cloud-address A; pdserve device chat|profile  P/D-Device
  pdserve plan --trace T | --group NAME:prompt=P,output=O,rate=R     Eq. 1 ratio per group
  pdserve group list|scale-out|scale-in|upgrade|substitute         group operations (admin)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

GENERATE_EPILOG = """\
The same request over the OpenAI-compatible HTTP door, with curl (-N: no buffering, so
the server-sent events show as they come):

  curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],
         "max_tokens":64,"temperature":0,"stream":true}'

  (add -H 'Authorization: Bearer KEY' for a keyed gateway, --cacert CERT for TLS)
"""


def _grpc_channel(address: str, tls_ca: str) -> Any:
    from services.common.auth import gateway_channel

    return gateway_channel(address, tls_ca)


class _Flags:
    """Adds flags whose help shows their default and their environment variable
    (PDSERVE_<COMMAND>_<FLAG> unless named); the variable sets the default."""

    def __init__(self, parser: argparse.ArgumentParser, command: str) -> None:
        self.parser = parser
        self.command = command

    def add(self, flag: str, type_: type, default: Any, help_: str, env: str = "",
            **kw: Any) -> None:
        from services.common.config import ENV_PREFIX, env_str

        env = env or f"{ENV_PREFIX}{self.command}_{flag.lstrip('-').replace('-', '_').upper()}"
        raw = env_str(env.removeprefix(ENV_PREFIX), "")
        if raw:
            default = raw.lower() in ("1", "true", "yes", "on") if type_ is bool else \
                ([raw] if kw.get("action") == "append" else type_(raw))
        shown = "unset" if default is None else repr(default)
        text = f"{help_} (default: {shown}; env {env})".replace("%", "%%")
        if type_ is bool:
            self.parser.add_argument(flag, action="store_true", default=default, help=text)
        elif kw.get("action") == "append":
            self.parser.add_argument(flag, type=type_, default=default, help=text, **kw)
        else:
            self.parser.add_argument(flag, type=type_, default=default, help=text, **kw)

ROLES = ("gateway", "prefill", "decode", "kvstore", "device", "worker", "admin")


def _up(args: argparse.Namespace) -> int:
    from services.launcher import UpOptions, run_up

    model = f"mock:{args.profile}" if args.engine == "mock" else args.model
    env = {"PDSERVE_SCHEDULER": args.scheduler, "PDSERVE_HTTP_PORT": str(args.http_port),
           "PDSERVE_TLS_CERT": args.tls_cert, "PDSERVE_TLS_KEY": args.tls_key,
           "PDSERVE_TLS_CLIENT_CA": args.tls_client_ca, "PDSERVE_API_KEY": args.api_key,
           "PDSERVE_REFLECTION": "0" if args.no_reflection else "1"}
    if args.scheduler == "reported-queue":
        env["PDSERVE_HEARTBEAT_S"] = "0.1"  # load reports every 100 ms, as in the paper
        env["PDSERVE_REGISTRY_POLL_S"] = "0.1"
    return run_up(UpOptions(
        prefill=args.prefill, decode=args.decode, model=model, host=args.host,
        port=args.port, log_dir=args.log_dir, groups=args.groups or "", extra_env=env,
        prefill_slots=args.slots, switchable=args.switchable, spares=args.spares,
        admin=args.admin))


def _serve(args: argparse.Namespace, rest: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"services.{args.role}.main")
    module.main(rest)
    return 0


async def _generate(args: argparse.Namespace) -> int:
    if args.http:
        from services.httpclient import generate_http

        return await asyncio.to_thread(generate_http, args)
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
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else None
    async with _grpc_channel(args.address, args.tls_ca) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        try:
            async for msg in stub.Generate(req, timeout=args.timeout, metadata=metadata):
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
    from services.cluster.registry import connect, list_instances
    from services.common.config import env_str

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
    upf = _Flags(up, "UP")
    upf.add("--prefill", int, 1, "prefill workers (default group)")
    upf.add("--decode", int, 1, "decode workers (default group)")
    upf.add("--groups", str, "", "scenario groups, e.g. code:2p1d,conv:3p2d (overrides "
           "--prefill/--decode)")
    upf.add("--model", str, "smollm2", "smollm2, tiny, or a checkpoint dir")
    upf.add("--engine", str, "torch", "torch, or mock: workers take the time a latency profile "
           "says (no torch)", choices=("torch", "mock"))
    upf.add("--profile", str, "smollm2-cpu", "mock engine profile: built-in name or a .json path")
    upf.add("--scheduler", str, "forward", "forward | rr-queue | los-queue | reported-queue")
    upf.add("--slots", int, 0, "prefill batch slots b_p (0: the worker default)")
    upf.add("--host", str, "127.0.0.1", "gateway bind address (gRPC and HTTP)")
    upf.add("--port", int, 50051, "gateway gRPC port")
    upf.add("--log-dir", str, "", "per-process logs and ready files (empty: a temp dir)")
    upf.add("--http-port", int, 8000, "gateway OpenAI-compatible HTTP port (0: a free one, "
           "-1: off)")
    upf.add("--tls-cert", str, "", "PEM certificate: the gateway serves gRPC and HTTP over TLS")
    upf.add("--tls-key", str, "", "PEM private key of --tls-cert")
    upf.add("--tls-client-ca", str, "", "PEM CA: the gateway requires client certificates "
           "(mutual TLS)")
    upf.add("--api-key", str, "", "require 'Authorization: Bearer <key>' at the gateway "
           "(comma-separated keys)", env="PDSERVE_API_KEY")
    upf.add("--no-reflection", bool, False, "turn gRPC server reflection off at the gateway")
    upf.add("--switchable", bool, False,
            "prefill/decode run as role-switchable workers (services/worker)")
    upf.add("--spares", int, 0, "idle workers in the spare pool (substitution, scale-out)")
    upf.add("--admin", bool, False, "run the admin service for pdserve group (on with --spares)")

    serve = sub.add_parser("serve", help="run one service (flags: see --help of the role)",
                           add_help=False)
    serve.add_argument("role", choices=ROLES)

    gen_p = sub.add_parser(
        "generate", help="stream a completion from a gateway (gRPC, or HTTP with --http)",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen_p.add_argument("prompt", help="the prompt (one user turn unless --raw)")
    gen = _Flags(gen_p, "GENERATE")
    gen.add("--address", str, "127.0.0.1:50051", "gateway gRPC address host:port")
    gen.add("--http", str, "", "use the OpenAI-compatible HTTP door at this base URL "
            "instead of gRPC, e.g. http://127.0.0.1:8000")
    gen.add("--max-tokens", int, None, "new tokens at most (unset: the gateway's default)")
    gen.add("--temperature", float, 0.0, "sampling temperature; 0 is greedy")
    gen.add("--top-p", float, None, "nucleus sampling (unset: off)")
    gen.add("--seed", int, None, "sampling seed")
    gen.add("--stop", str, None, "stop string (repeat the flag for several)", action="append")
    gen.add("--scenario", str, "", "scenario group (empty: the default group)")
    gen.add("--ttft-deadline-ms", int, 0, "time-to-first-token deadline in ms (0: none)")
    gen.add("--raw", bool, False, "send the prompt as is, without the chat template")
    gen.add("--timeout", float, 300.0, "deadline of the whole call, seconds")
    gen.add("--api-key", str, "", "API key sent as 'Authorization: Bearer <key>'",
            env="PDSERVE_API_KEY")
    gen.add("--tls-ca", str, "", "PEM CA (or the self-signed certificate) to verify a TLS "
            "gateway; set: gRPC uses TLS")

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    prep = msub.add_parser("prepare", help="convert and cache a built-in model")
    _Flags(prep, "MODEL").add("--model", str, "smollm2", "smollm2, tiny, or a checkpoint dir",
                              env="PDSERVE_MODEL")

    st = sub.add_parser("status", help="list scenario groups and live instances")
    _Flags(st, "STATUS").add("--redis-url", str, "", "the cluster's Redis (pdserve up prints "
                             "it)", env="PDSERVE_REDIS_URL")

    from services.device.cli import add_parser as add_device_parser

    add_device_parser(sub)
    from services.admin.cli import add_parser as add_group_parser

    add_group_parser(sub)
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
    elif args.cmd == "group":
        from services.admin.cli import run as run_group

        code = run_group(args)
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
