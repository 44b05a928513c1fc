"""``pdserve device``: talk to a device process, and measure profiles for its optimiser.

  pdserve device chat "prompt" [--address A] [--mode pd_device|cloud_only|device_only]
        streams the displayed answer, then prints TTFT, paced TPOT and the hand-off point
  pdserve device profile --cloud A [--model M] [--speed-factor k] [--out FILE]
        measures T_pf(n), t_dev (this host's model, stretched by k), the cloud's TTFT(n)
        and TPOT through the gateway, and writes the optimiser profile JSON
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

MODE_NAMES = ("pd_device", "cloud_only", "device_only")


def add_parser(sub: Any) -> None:
    dev = sub.add_parser("device", help="P/D-Device: chat through a device, measure profiles")
    dsub = dev.add_subparsers(dest="device_cmd", required=True)
    chat = dsub.add_parser("chat", help="chat through a device process")
    chat.add_argument("prompt")
    chat.add_argument("--address", default="127.0.0.1:50061", help="the device process")
    chat.add_argument("--mode", choices=MODE_NAMES, default=None)
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--budget", type=int, default=0, help="N (0: the optimiser's)")
    chat.add_argument("--refine", type=float, default=0.0, help="rho (0: the optimiser's)")
    chat.add_argument("--tau-ms", type=float, default=0.0, help="pace (0: the optimiser's)")
    chat.add_argument("--raw", action="store_true", help="no chat template")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    chat.add_argument("--device-index", type=int, default=0, help="device of a fleet process")
    chat.add_argument("--timeout", type=float, default=300.0)
    prof = dsub.add_parser("profile", help="measure the optimiser profile")
    prof.add_argument("--cloud", required=True, help="gateway address")
    prof.add_argument("--tls-ca", default="", help="PEM of the CA of a TLS gateway (default: "
                      "plaintext)")
    prof.add_argument("--api-key", default="", help="API key of a keyed gateway (default: none)")
    prof.add_argument("--model", default="smollm2")
    prof.add_argument("--speed-factor", type=float, default=1.0)
    prof.add_argument("--sizes", default="64,256,1024", help="prompt lengths to measure")
    prof.add_argument("--out", default="device-profile.json")


def run(args: argparse.Namespace) -> int:
    if args.device_cmd == "chat":
        return asyncio.run(_chat(args))
    return asyncio.run(_profile(args))


async def _chat(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.v1 import common_pb2
    from pdserve.v1 import device_service_pb2 as pb
    from pdserve.v1 import device_service_pb2_grpc as pb_grpc
    from services.common.errors import error_info

    req = pb.ChatRequest(prompt=args.prompt, use_chat_template=not args.raw,
                         token_budget=args.budget, refine_ratio=args.refine, tau_ms=args.tau_ms,
                         temperature=args.temperature, stop=args.stop,
                         device_index=args.device_index)
    if args.top_p is not None:
        req.top_p = args.top_p
    if args.seed is not None:
        req.seed = args.seed
    if args.mode:
        req.mode = pb.DeviceMode.Value(f"DEVICE_MODE_{args.mode.upper()}")
    if args.max_tokens is not None:
        req.max_tokens = args.max_tokens
    async with grpc.aio.insecure_channel(args.address) as channel:
        try:
            async for msg in pb_grpc.DeviceServiceStub(channel).Chat(req, timeout=args.timeout):
                sys.stdout.write(msg.text)
                sys.stdout.flush()
                if msg.HasField("summary"):
                    print("\n\n" + describe(msg.summary, pb, common_pb2), file=sys.stderr)
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            reason = f" [{info.reason}]" if info else ""
            print(f"\nerror: {e.code().name}{reason}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def describe(s: Any, pb: Any, common_pb2: Any) -> str:
    mode = pb.DeviceMode.Name(s.mode).removeprefix("DEVICE_MODE_").lower()
    reason = common_pb2.FinishReason.Name(s.finish_reason).removeprefix("FINISH_REASON_")
    lines = [f"[{mode} | {reason.lower()}] ttft {s.ttft_ms:.0f} ms | paced tpot mean "
             f"{s.mean_tpot_ms:.1f} ms, p99 {s.p99_tpot_ms:.1f} ms, max {s.max_tpot_ms:.1f} ms"
             f" | e2e {s.e2e_ms:.0f} ms"
             + (f" | first token held up to {s.first_token_hold_ms:.0f} ms"
                if s.first_token_hold_ms else "")]
    if s.mode == pb.DEVICE_MODE_PD_DEVICE:
        hand = (f"hand-off after token {s.handoff_index} at {s.handoff_ms:.0f} ms"
                if s.handoff_index else "no hand-off (the cloud answered in full)")
        lines.append(f"{hand} | cloud: {s.cloud_tokens} tokens ({s.cloud_tokens_dropped} "
                     f"dropped), busy {s.cloud_busy_ms:.0f} ms, budget N={s.token_budget} | "
                     f"rho {s.refine_ratio:g} (P' {s.refined_prompt_tokens}/{s.prompt_tokens}"
                     f" tokens{', ' + s.refine_method if s.refine_method else ''}) | "
                     f"tau {s.tau_ms:.1f} ms")
    if s.fallback:
        lines.append(f"fallback: {s.fallback}")
    return "\n".join(lines)


async def _profile(args: argparse.Namespace) -> int:

    from pdserve.v1 import generation_service_pb2 as gpb
    from pdserve.v1 import generation_service_pb2_grpc as gpb_grpc
    from services.common.auth import gateway_channel
    from services.device.engine import TorchDevice
    from services.device.planning import measure_device
    from services.engine.worker import ModelThread

    sizes = tuple(int(x) for x in args.sizes.split(","))
    thread = ModelThread("profile")
    engine = await thread.run(TorchDevice, args.model, "", 0, args.speed_factor)
    await thread.run(engine.warmup)
    device = await thread.run(measure_device, engine, sizes)
    thread.shutdown()
    ttft, gaps, t2 = [], [], []
    async with gateway_channel(args.cloud, args.tls_ca, args.api_key) as channel:
        stub = gpb_grpc.GenerationServiceStub(channel)
        for n in sizes:
            t0 = time.monotonic()
            times = []
            async for msg in stub.Generate(gpb.GenerateRequest(
                    prompt_token_ids=[3 + i % 200 for i in range(n)], max_tokens=16)):
                times.extend([time.monotonic()] * len(msg.token_ids))
            ttft.append([n, (times[0] - t0) * 1e3])
            # t1 -> t2 (the cloud's KV handoff) apart: it sizes the first-token hold.
            t2.append([n, (times[1] - times[0]) * 1e3 if len(times) > 1 else 0.0])
            gaps.append((times[-1] - times[1]) * 1e3 / max(1, len(times) - 2))
    out = {"device": device, "cloud": {"ttft": ttft, "tpot_ms": sum(gaps) / len(gaps),
                                       "t2_gap": t2},
           "about": f"measured by pdserve device profile: model {args.model}, k "
                    f"{args.speed_factor:g}, cloud {args.cloud} (its TTFT includes this link)"}
    text = json.dumps(out, indent=1)
    Path(args.out).write_text(text)  # noqa: ASYNC240 (once, at the end of a CLI run)
    print(text)
    return 0
