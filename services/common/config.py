"""Typed service configuration.

Each service has one frozen dataclass. Defaults are written once, on the dataclass;
``load_config`` layers ``PDSERVE_<FIELD>`` environment variables over them and
CLI flags (``--field-name``) over those. This module is the only one that reads
``os.environ`` for pdserve settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import math
import os
import re
import socket
import tokenize
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

ENV_PREFIX = "PDSERVE_"
DEFAULT_CACHE_DIR = "~/.cache/pdserve"  # converted models; PDSERVE_CACHE_DIR overrides

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting is missing or out of range; the message says which and why."""


@dataclass(frozen=True)
class ServiceConfig:
    """Settings every service process shares."""

    host: str = "127.0.0.1"  # bind address for gRPC (0.0.0.0 in containers)
    port: int = 0  # gRPC port; 0 picks a free one
    advertise_host: str = ""  # address peers dial; empty: host, or this box's IP for 0.0.0.0
    redis_url: str = ""  # redis://..., unix://...; empty only for pdserve up (embedded)
    group: str = "default"  # scenario group this instance serves
    instance_id: str = ""  # empty: <role>-<hostname>-<pid>
    heartbeat_s: float = 1.0  # registry heartbeat period
    registry_ttl_s: float = 3.0  # an instance that misses heartbeats this long drops out
    grace_s: float = 5.0  # graceful-shutdown window for in-flight RPCs
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    ready_file: str = ""  # written with {"address": ...} once SERVING (used by pdserve up)
    metrics_port: int = 0  # Prometheus /metrics HTTP port; 0 picks a free one, -1 turns it off
    # Shared secret every internal RPC (prefill, decode, kvstore) must carry; empty: open.
    # pdserve up generates one for its children.
    cluster_token: str = ""
    # Test-only pauses at named points of a request's path (common/faultpoints.py), e.g.
    # "prefill.after_push=1.5"; empty in production.
    fault_delays: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if not -1 <= self.metrics_port < 65536:
            raise ConfigError(f"metrics_port must be in [-1, 65535], got {self.metrics_port}")
        if not 0 < self.heartbeat_s < self.registry_ttl_s < math.inf:  # also rejects NaN
            raise ConfigError(
                f"need 0 < heartbeat_s < registry_ttl_s, got {self.heartbeat_s}, "
                f"{self.registry_ttl_s}"
            )
        if self.fault_delays:
            from services.common.faultpoints import parse

            try:
                parse(self.fault_delays)
            except ValueError as e:
                raise ConfigError(f"fault_delays: {e}") from None
        if not self.group or ":" in self.group or "{" in self.group:
            raise ConfigError(
                f"group must be a non-empty name without ':' or '{{', got {self.group!r}")

    def advertised(self, port: int) -> str:
        """host:port that other processes should dial to reach a server bound on ``port``."""
        host = self.advertise_host or self.host
        if host in ("0.0.0.0", "::", ""):
            host = _primary_ip()
        return f"{host}:{port}"

    def resolved_instance_id(self, role: str) -> str:
        return self.instance_id or f"{role}-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class ModelConfig:
    """Which model a model-using service loads."""

    model: str = "smollm2"  # "smollm2", "tiny", or a local HF checkpoint dir
    cache_dir: str = ""  # where converted models are cached; empty: ~/.cache/pdserve
    torch_threads: int = 0  # 0: one per core


def _primary_ip() -> str:
    """This host's outbound IP, without sending anything (UDP connect sets no traffic)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _field_type(cls: type, f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType):  # e.g. `int | None`
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _parse(tp: type, raw: str, name: str) -> Any:
    try:
        if tp is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return tp(raw)
    except ValueError:
        raise ConfigError(f"{name}: cannot parse {raw!r} as {tp.__name__}") from None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in its class source (trailing, or the lines just above),
    which is where defaults are documented once; used as the flag's --help line."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        with contextlib.suppress(tokenize.TokenError, IndentationError):
            for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines)).readline):
                if tok.type == tokenize.COMMENT:
                    comments[tok.start[0]] = tok.string.lstrip("#").strip()
        for no, line in enumerate(lines, 1):
            m = _FIELD_LINE.match(line)
            if m is None:
                continue
            doc = comments.get(no, "")
            if not doc or not line.lstrip().startswith(m.group(1)):
                above: list[str] = []
                prev = no - 1
                while prev in comments and lines[prev - 1].lstrip().startswith("#"):
                    above.insert(0, comments[prev])
                    prev -= 1
                doc = " ".join(above) or doc
            if doc:
                out[m.group(1)] = doc
    return out


_FIELD_LINE = re.compile(r"^    (\w+)\s*:\s*[^=#]+=")


def load_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    env: typing.Mapping[str, str] | None = None,
    prog: str | None = None,
) -> C:
    """Build ``cls`` from its defaults, then ``PDSERVE_*`` env, then CLI flags."""
    env = os.environ if env is None else env
    assert dataclasses.is_dataclass(cls)
    fields = dataclasses.fields(cls)
    values: dict[str, Any] = {}
    for f in fields:
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            values[f.name] = _parse(_field_type(cls, f), env[key], key)
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    docs = field_docs(cls)
    for f in fields:
        tp = _field_type(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = docs.get(f.name, "")
        help_ = f"{doc + ' ' if doc else ''}[env {ENV_PREFIX}{f.name.upper()}; " \
                f"default: {default!r}]".replace("%", "%%")
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, help=help_)
    ns = parser.parse_args(list(argv) if argv is not None else [])
    for f in fields:
        raw = getattr(ns, f.name)
        if raw is None:
            continue
        values[f.name] = raw if isinstance(raw, bool) else _parse(_field_type(cls, f), raw, f.name)
    return cls(**values)


def as_env(cfg: Any) -> dict[str, str]:
    """The env that reproduces ``cfg`` (for launching child processes)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[ENV_PREFIX + f.name.upper()] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    return out


def env_str(name: str, default: str = "") -> str:
    """Read one non-service setting (e.g. PDSERVE_CACHE_DIR for CLI tools)."""
    return os.environ.get(ENV_PREFIX + name, default)
