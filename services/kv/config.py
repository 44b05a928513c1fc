"""Data-plane settings shared by every process that moves KV (prefill, decode, kvstore).

Mixed into ``WorkerConfig`` and ``KvStoreConfig``, so each field is a flag
(``--kv-transports``) and a ``PDSERVE_*`` variable (``PDSERVE_KV_TRANSPORTS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import ConfigError

KNOWN_TRANSPORTS = ("shm", "rdma", "tcp")
TRANSFER_MODES = ("contiguous", "block")


def parse_transports(spec: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in spec.split(",") if t.strip())
    bad = [t for t in names if t not in KNOWN_TRANSPORTS]
    if bad or not names:
        raise ConfigError(f"kv_transports: unknown or empty {spec!r}; choose from "
                          f"{','.join(KNOWN_TRANSPORTS)}")
    return names


@dataclass(frozen=True)
class KvTransferConfig:
    """KV data-plane settings."""

    # Transports this process may use, best first. A transfer takes the first one both ends
    # support: shm only when both ends share a kernel, rdma when the Mooncake engine loads.
    kv_transports: str = "shm,rdma,tcp"
    # On a machine without RDMA devices Mooncake only has its TCP transport, which is slower
    # than our tcp; rdma is then offered only when this is set (tests, demos). Never silent:
    # the protocol in use is reported either way.
    kv_rdma_tcp_mode: bool = False
    # A transfer that fails on the negotiated path is retried once on tcp; False fails fast.
    kv_fallback: bool = True
    # contiguous: one buffer, one metadata exchange; block: fixed blocks, each confirmed.
    kv_transfer_mode: str = "contiguous"
    kv_block_tokens: int = 16  # tokens per block in block mode
    kv_transfer_timeout_s: float = 30.0  # upper bound of one transfer when no deadline is set
    # Warm KV memory a client keeps, each up to this many MiB: a shm push keeps its mappings
    # of the kvstore's pooled memfds (the next push into one skips the page-table set-up),
    # a tcp fetch receives into buffers an earlier, released fetch left (no page faults).
    kv_client_cache_mb: int = 1024
    # Prefill sends each layer's KV over tcp as soon as it is computed, while later layers
    # compute (push of layer i overlaps compute of layer i+1).
    kv_layer_overlap: bool = False

    def __post_init__(self) -> None:
        # Listed first among the bases so this runs; chain to ServiceConfig's checks.
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        parse_transports(self.kv_transports)
        if self.kv_transfer_mode not in TRANSFER_MODES:
            raise ConfigError(f"kv_transfer_mode must be one of {TRANSFER_MODES}, got "
                              f"{self.kv_transfer_mode!r}")
        if self.kv_block_tokens <= 0 or not self.kv_transfer_timeout_s > 0:
            raise ConfigError("kv_block_tokens and kv_transfer_timeout_s must be positive")
        if self.kv_client_cache_mb < 0:
            raise ConfigError("kv_client_cache_mb must be >= 0")

    @property
    def transports(self) -> tuple[str, ...]:
        return parse_transports(self.kv_transports)
