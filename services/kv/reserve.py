"""ReserveKv on the kvstore's Unix socket: the reservation of a prefill that runs on the
kvstore's host, in one round trip on a pooled data connection (``connpool``) instead of
a gRPC call. At c = 8 with an instant engine the gRPC call was one of four per request,
with its CPU on both sides and its wake-ups on the TTFT path.

Only on the Unix socket: it sits in a private directory, so only processes of the same
host and user reach it, where the gRPC call is also guarded by the cluster token. Across
hosts (or with tracing on, so the call joins the request's trace) prefill uses gRPC.
The answer is the same ``ReserveKvResponse``; a refusal comes back as the same
``PdserveError`` (code, reason, message) that ReserveKv would have raised.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import socket
import struct

import grpc
from google.protobuf.message import DecodeError

from pdserve.v1 import kvstore_service_pb2 as pb
from services.common.errors import PdserveError
from services.kv.base import Status, TransferError
from services.kv.connpool import POOL
from services.kv.wire import RESP, Op, pack_req, recv_exact

_NO_HANDLE = "00" * 16


async def reserve_over_channel(path: str, request_id: str, nbytes: int, lease_ms: int,
                               owner: str) -> pb.ReserveKvResponse:
    """Reserve ``nbytes`` at the kvstore whose Unix socket is ``path``. Raises the
    kvstore's refusal as a ``PdserveError``, or ``TransferError`` when the channel
    itself failed (the caller then asks over gRPC)."""
    loop = asyncio.get_running_loop()
    raw_owner = owner.encode()[:256]
    request = (pack_req(Op.RESERVE, _NO_HANDLE, request_id, nbytes, lease_ms)
               + struct.pack("<H", len(raw_owner)) + raw_owner)
    try:
        sock, answer = await POOL.open_exchange("unix", path, request,
                                                lambda s: _answer(loop, s))
    except OSError as e:
        raise TransferError(f"reserving on {path} failed: {e}") from e
    POOL.give_back("unix", path, sock)  # answered in full, refusal or not
    if isinstance(answer, PdserveError):
        raise answer
    return answer


async def _answer(loop: asyncio.AbstractEventLoop,
                  sock: socket.socket) -> pb.ReserveKvResponse | PdserveError:
    status, _, ilen = RESP.unpack(await recv_exact(loop, sock, RESP.size))
    info = (await recv_exact(loop, sock, ilen)).decode(errors="replace") if ilen else ""
    if status == Status.REFUSED:
        code, _, rest = info.partition("|")
        reason, _, message = rest.partition("|")
        return PdserveError(message or info, reason=reason or "KV_RESERVE_REFUSED",
                            code=grpc.StatusCode.__members__.get(code, grpc.StatusCode.INTERNAL))
    if status != Status.OK:
        raise TransferError(f"kvstore refused the reservation: {info}", status)
    try:
        return pb.ReserveKvResponse.FromString(base64.b64decode(info, validate=True))
    except (binascii.Error, DecodeError) as e:
        raise TransferError(f"kvstore sent an unreadable reservation: {e}",
                            Status.PROTOCOL) from e
