"""``pdserve group ...``: the admin service's operations from the command line.

  pdserve group list
  pdserve group scale-out NAME --prefill N --decode M
  pdserve group scale-in NAME
  pdserve group upgrade [--group G ...] --set model=M --set slots=8
  pdserve group substitute [INSTANCE_ID]       (none: every failed instance)

The admin address is ``--admin HOST:PORT`` (``pdserve up`` prints it), or found in the
registry (``--redis-url`` / PDSERVE_REDIS_URL) as the instance of role "admin".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import grpc

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc


def add_parser(sub: Any) -> None:
    g = sub.add_parser("group", help="group operations: list, scale-out/in, upgrade, substitute")
    g.add_argument("--admin", default="", help="admin service address (host:port)")
    g.add_argument("--redis-url", default="", help="find the admin service in this registry")
    g.add_argument("--cluster-token", default="",
                   help="the cluster's token (default: env PDSERVE_CLUSTER_TOKEN; pdserve up "
                        "writes it to <log dir>/cluster-token)")
    g.add_argument("--timeout", type=float, default=0.0,
                   help="per-step timeout, seconds (0: the service default)")
    gs = g.add_subparsers(dest="group_cmd", required=True)
    gs.add_parser("list", help="groups, members and the spare pool")
    so = gs.add_parser("scale-out", help="a whole new group from the spare pool")
    so.add_argument("name")
    so.add_argument("--prefill", type=int, required=True)
    so.add_argument("--decode", type=int, required=True)
    si = gs.add_parser("scale-in", help="remove a group: out of routing, drain, release")
    si.add_argument("name")
    up = gs.add_parser("upgrade", help="rolling upgrade, one group after another")
    up.add_argument("--group", action="append", default=[], help="(repeat) default: all")
    up.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="worker setting, e.g. model=tiny or slots=8 (repeat)")
    su = gs.add_parser("substitute", help="replace a failed instance by a spare")
    su.add_argument("instance_id", nargs="?", default="")


async def _address(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin)
    from services.cluster.registry import connect, list_instances
    from services.common.config import env_str

    url = args.redis_url or env_str("REDIS_URL")
    if not url:
        raise SystemExit("error: pass --admin HOST:PORT or --redis-url (pdserve up prints both)")
    client = connect(url)
    try:
        found = [i for i in await list_instances(client) if i.role == "admin"]
    finally:
        await client.aclose()
    if not found:
        raise SystemExit("error: no admin service is registered (pdserve up --admin)")
    return found[0].address


def _print_groups(r: apb.ListGroupsResponse) -> None:
    for g in r.groups:
        print(f"group {g.name}: {g.prefill}p{g.decode}d")
        for m in g.members:
            print(f"  {m.role:8} {m.instance_id:28} {m.address:22} {m.state}")
    print(f"spares: {len(r.spares)}")
    for m in r.spares:
        print(f"  idle     {m.instance_id:28} {m.address:22}")


async def _run(args: argparse.Namespace) -> int:
    from services.common.errors import error_info

    address = await _address(args)
    t = args.timeout
    from services.common.auth import token_interceptors
    from services.common.config import env_str

    token = args.cluster_token or env_str("CLUSTER_TOKEN")
    async with grpc.aio.insecure_channel(address,
                                         interceptors=token_interceptors(token) or None) as ch:
        stub = apb_grpc.AdminServiceStub(ch)
        try:
            if args.group_cmd == "list":
                _print_groups(await stub.ListGroups(apb.ListGroupsRequest(), timeout=30))
                return 0
            if args.group_cmd == "scale-out":
                call = stub.ScaleOut(apb.ScaleOutRequest(
                    group=args.name, prefill=args.prefill, decode=args.decode, timeout_s=t))
            elif args.group_cmd == "scale-in":
                call = stub.ScaleIn(apb.ScaleInRequest(group=args.name, timeout_s=t))
            elif args.group_cmd == "upgrade":
                settings = dict(kv.split("=", 1) for kv in args.set if "=" in kv)
                if len(settings) != len(args.set):
                    raise SystemExit("error: --set takes KEY=VALUE")
                call = stub.RollingUpgrade(apb.RollingUpgradeRequest(
                    groups=args.group, settings=settings, timeout_s=t))
            else:
                call = stub.Substitute(apb.SubstituteRequest(instance_id=args.instance_id,
                                                             timeout_s=t))
            ok = False
            async for e in call:
                print(f"[{e.elapsed_ms / 1e3:7.2f}s] {e.message}", flush=True)
                ok = ok or (e.done and e.ok)
            return 0 if ok else 1
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            reason = f" [{info.reason}]" if info else ""
            print(f"error: {e.code().name}{reason}: {e.details()}", file=sys.stderr)
            return 1


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))
