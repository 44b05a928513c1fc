"""Property-based fuzzing (hypothesis) of a real-process cluster: GenerateRequests through
the public API, and raw bytes on the kvstore's data port. Shared by tests/faults/test_fuzz.py
(about 200 examples) and bench/fuzz.py (thousands).

Properties: no process dies; a request ``validate`` refuses gets INVALID_ARGUMENT with an
ErrorInfo; any other request gets tokens (or, with a TTFT deadline, DEADLINE_EXCEEDED with an
ErrorInfo); no answer is UNKNOWN or INTERNAL; the data port answers garbage with a refusal
or a close, never a hang; and nothing is held afterwards.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st

from pdserve.v1 import generation_service_pb2
from services.common.errors import InvalidArgument, error_info
from services.gateway.validation import validate
from services.kv.wire import MAGIC, REQ, VERSION
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer

INT32 = (-(2**31), 2**31 - 1)
texts = st.text(max_size=40) | st.text(st.characters(codec="utf-8"), max_size=200)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.sampled_from(
    [0.0, 1e-45, 1e-6, 0.5, 1.0, 2.0, -0.0, -1.0])


@st.composite
def generate_requests(draw: st.DrawFn) -> generation_service_pb2.GenerateRequest:
    kw: dict[str, object] = {}
    which = draw(st.sampled_from(["text", "ids", "both", "none"]))
    if which in ("text", "both"):
        kw["prompt"] = draw(texts)
    if which in ("ids", "both"):
        kw["prompt_token_ids"] = draw(
            st.lists(st.integers(*INT32) | st.integers(0, 300), max_size=40)
            | st.lists(st.integers(0, 200), min_size=1000, max_size=1100))
    if draw(st.booleans()):
        kw["max_tokens"] = draw(st.integers(-3, 6) | st.integers(*INT32))
    else:
        kw["max_tokens"] = draw(st.integers(1, 6))  # keep examples short
    kw["temperature"] = draw(floats)
    if draw(st.booleans()):
        kw["top_p"] = draw(floats)
    if draw(st.booleans()):
        kw["seed"] = draw(st.integers(0, 2**64 - 1))
    kw["stop"] = draw(st.lists(texts, max_size=20))
    kw["scenario"] = draw(st.sampled_from(["", "default"]) | texts)
    kw["request_id"] = draw(st.sampled_from(["", "dup"]) | texts | st.text(min_size=120,
                                                                          max_size=200))
    if draw(st.booleans()):
        kw["ttft_deadline_ms"] = draw(st.integers(0, 2**32 - 1))
    kw["use_chat_template"] = draw(st.booleans())
    kw["model"] = draw(st.sampled_from(["", "tiny"]) | texts)
    return generation_service_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


printable = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]),
                   max_size=30)


@st.composite
def valid_requests(draw: st.DrawFn) -> generation_service_pb2.GenerateRequest:
    """Requests inside every documented bound (the gateway must serve them)."""
    kw: dict[str, object] = {"max_tokens": draw(st.integers(1, 6))}
    if draw(st.booleans()):
        kw["prompt"] = draw(st.text(min_size=1, max_size=200).filter(str.strip))
    else:
        kw["prompt_token_ids"] = draw(st.lists(st.integers(0, 255), min_size=1, max_size=60))
    kw["temperature"] = draw(st.sampled_from([0.0, 1e-45, 1e-7]) | st.floats(0, 2))
    if draw(st.booleans()):
        kw["top_p"] = draw(st.floats(0.05, 1.0))
    if draw(st.booleans()):
        kw["seed"] = draw(st.integers(0, 2**64 - 1))
    kw["stop"] = draw(st.lists(printable.filter(bool), max_size=3))
    kw["request_id"] = draw(st.sampled_from(["", "dup", "café ✓"]) | printable)
    kw["scenario"] = draw(st.sampled_from(["", "default", "nobody-serves-this"]))
    kw["model"] = draw(st.sampled_from(["", "tiny"]))
    return generation_service_pb2.GenerateRequest(**kw)  # type: ignore[arg-type]


def any_requests() -> st.SearchStrategy[generation_service_pb2.GenerateRequest]:
    """Half inside the bounds, half anywhere."""
    return st.one_of(valid_requests(), generate_requests())


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))


class ApiOracle:
    """What the gateway must answer, from the same validation the gateway runs, plus the
    rules no answer may break."""

    def __init__(self, model: str = "tiny", default_max_tokens: int = 8) -> None:
        self.info = ModelInfo.load(model)
        self.tok = TextTokenizer(self.info.path)
        self.default_max_tokens = default_max_tokens

    def expect_invalid(self, req: generation_service_pb2.GenerateRequest) -> bool:
        try:
            validate(req, "0" * 32, self.info, self.tok, self.default_max_tokens)
        except InvalidArgument:
            return True
        return False

    def check(self, address: str, req: generation_service_pb2.GenerateRequest,
              tally: Tally) -> None:
        invalid = self.expect_invalid(req)
        tokens = 0
        with grpc.insecure_channel(address) as ch:
            from pdserve.v1 import generation_service_pb2_grpc

            stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
            try:
                for msg in stub.Generate(req, timeout=30):
                    tokens += len(msg.token_ids)
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                info = error_info(e)
                tally.counts[f"{code.name}"] += 1
                assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), \
                    (req, e.details())  # type: ignore[attr-defined]
                assert info is not None, (code, e.details())  # type: ignore[attr-defined]
                assert len(e.details() or "") < 1000  # type: ignore[attr-defined]
                if invalid:
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (req, e.details())  # type: ignore[attr-defined]
                    return
                assert req.ttft_deadline_ms and code in (
                    grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED), \
                    (req, code, e.details())  # type: ignore[attr-defined]
                return
        assert not invalid, f"validation refuses it, but the gateway served it: {req}"
        assert tokens >= 1, req
        tally.counts["OK"] += 1


@st.composite
def data_frames(draw: st.DrawFn) -> bytes:
    """Garbage, or a well-formed header with hostile fields, plus some trailing bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    op = draw(st.integers(0, 255) | st.integers(1, 9))
    rid_len = draw(st.integers(0, 65535) | st.integers(0, 40))
    head = REQ.pack(draw(st.sampled_from([MAGIC, b"PDKX"])),
                    draw(st.sampled_from([VERSION, 0, 255])), op, draw(st.integers(0, 255)),
                    draw(st.binary(min_size=16, max_size=16)), rid_len,
                    draw(st.integers(0, 2**64 - 1) | st.integers(0, 4096)),
                    draw(st.integers(0, 2**64 - 1) | st.integers(0, 64)))
    return head + draw(st.binary(max_size=200))


def poke_data_port(host: str, port: int, frame: bytes, tally: Tally,
                   timeout_s: float = 15.0) -> None:
    """Send ``frame``, close our side, read until the kvstore closes: it must end the
    connection (an answer or a plain close) well within its idle timeout, never hang."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        try:
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server already closed: refused early
            tally.counts["data:closed-early"] += 1
            return
        got = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    if len(got) >= 11:
        status = struct.unpack_from("<B", got)[0]
        tally.counts[f"data:status{status}"] += 1
    else:
        tally.counts["data:closed"] += 1
