"""The engine contract: what prefill, decode and the device call on a loaded model.

``ModelRunner`` (torch + transformers) and ``MockRunner`` (a latency profile, no torch)
both implement ``Runner``. A request's KV state is opaque to the workers (a
``DynamicCache``, a paged sequence, or the mock's counter): they only hand it back to
the runner that made it, so it is typed ``KvState``.

Optional abilities are declared, not probed: ``layer_packer`` returns None when the
engine cannot hook its decoder layers (per-layer transfer is then skipped), and
``attention_model`` returns None when there is no attention to read (P/D-Device's
refine probe then falls back to uniform refinement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from services.engine.kv import LayerPacker
    from services.engine.paged import BlockAllocator, BlockTable
    from services.engine.sampling import Sampling
    from services.kv.layout import KvMeta
    from services.model.info import ModelInfo

KvState = Any  # per-request KV, owned by the runner that produced it
OnLayer = Callable[[int, Any], None]  # (layer index, the cache so far), on the model thread


@runtime_checkable
class Runner(Protocol):
    """One loaded model. Calls are synchronous and run on one dedicated thread."""

    info: ModelInfo
    fingerprint: str

    def warmup(self) -> None: ...

    # -- prefill side
    def attach_prefix_cache(self, capacity_bytes: int, block_tokens: int) -> object:
        """Reuse the KV of cached prompt prefixes from now on (LRU under the cap)."""

    def prefill(self, token_ids: list[int], params: Sampling, reuse_prefix: bool = True,
                on_layer: OnLayer | None = None) -> tuple[int, KvState]:
        """Run the prompt; the first token and the whole prompt's KV."""
        ...

    def layer_packer(self, num_tokens: int) -> LayerPacker | None:
        """A per-layer transfer buffer, or None when layers cannot be hooked."""
        ...

    def pack(self, state: KvState, checksum: bool) -> tuple[KvMeta, np.ndarray]:
        """The request's KV as one contiguous transfer buffer (header + payload)."""
        ...

    def prefix_metrics(self) -> dict[str, float]:
        """Prefix-cache counters for the registry load (empty when there is none)."""
        ...

    def attention_model(self) -> Any | None:
        """The torch model whose attention the refine probe reads, or None."""
        ...

    # -- decode side
    def restore(self, buf: memoryview, max_new_tokens: int) -> tuple[KvMeta, KvState]: ...

    def decode_step(self, token: int, state: KvState, params: Sampling) -> int: ...

    def attach_pool(self, pool_tokens: int, block_tokens: int) -> BlockAllocator:
        """The paged KV pool decode reserves blocks in (accounting only for the mock)."""
        ...

    def restore_paged(self, buf: memoryview, table: BlockTable) -> tuple[KvMeta, KvState]:
        """RecvScatter: copy a received KV buffer into the reserved blocks."""
        ...

    def decode_batch(self, tokens: list[int], states: list[KvState],
                     params: list[Sampling]) -> list[int]:
        """One forward over every active sequence; the next token of each."""
        ...
