"""The on-device model, emulated on this host (docs/pd-device.md, "Device emulation").

Two engines behind one interface (``new_session``, ``prefill_chunk``, ``decode``):
  - ``TorchDevice``: the real model through torch + transformers (the same checkpoint
    and tokenizer as the cloud by default; ``tiny`` in tests). A device k times slower
    than this host is emulated by stretching wall time: after each model call that took
    e ms, the model thread sleeps (k - 1) * e more. Tokens are real: greedy, or sampled
    with the cloud's own rule (``services.engine.sampling.sample``, keyed by
    (seed, position)), so a seeded answer is the same whichever side made each token.
  - ``MockDevice``: a latency profile (``profiles/*.json``) for benchmarks: it sleeps
    what the profile says (times ``scale``: a fleet's devices differ in speed) and emits
    deterministic filler tokens; named a mock, never used where token identity matters.
Catch-up prefill is chunked: each chunk is appended to the session's transformers
``DynamicCache`` (positions follow from the cache length), and the chunk's last
logits give the next token.
Both are synchronous, called on the device's single model thread.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.sampling import Sampling

PROFILE_DIR = Path(__file__).parent / "profiles"


def load_profile(name: str) -> dict[str, Any]:
    """A device profile: built-in name (``profiles/<name>.json``) or a .json path."""
    p = Path(name)
    if not (p.suffix == ".json" and p.exists()):
        p = PROFILE_DIR / f"{name}.json"
    if not p.exists():
        known = sorted(q.stem for q in PROFILE_DIR.glob("*.json"))
        raise ValueError(f"unknown device profile {name!r}; built-in: {known}, or a .json path")
    return dict(json.loads(p.read_text()))


@dataclass
class Session:
    cached: int = 0  # tokens in the cache
    cache: Any = None
    compute_ms: float = 0.0  # emulated device time spent (stretched)
    tail: list[int] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)  # greedy unless the chat asks


class TorchDevice:
    def __init__(self, spec: str, cache_dir: str = "", threads: int = 0,
                 speed_factor: float = 1.0) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from services.model.info import ModelInfo

        if speed_factor < 1.0:
            raise ValueError(f"speed_factor must be >= 1 (a device is not faster than "
                             f"this host), got {speed_factor}")
        if threads:
            torch.set_num_threads(threads)
        self.info = ModelInfo.load(spec, cache_dir)
        self.k = speed_factor
        self.model = AutoModelForCausalLM.from_pretrained(self.info.path, dtype=torch.float32)
        self.model.eval()

    def new_session(self, sampling: Sampling | None = None) -> Session:
        from transformers import DynamicCache

        return Session(cache=DynamicCache(config=self.model.config),
                       sampling=sampling or Sampling())

    def _stretch(self, s: Session, t0: float) -> None:
        e = time.monotonic() - t0
        if self.k > 1.0:
            time.sleep((self.k - 1.0) * e)
        s.compute_ms += 1e3 * e * self.k

    def prefill_chunk(self, s: Session, ids: list[int]) -> int:
        import torch

        from services.engine.sampling import sample

        t0 = time.monotonic()
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long),
                             past_key_values=s.cache, use_cache=True, logits_to_keep=1)
            s.cached += len(ids)
            # The token chosen sits at position ``cached`` (the cloud's numbering too).
            nxt = sample(out.logits[0, -1], s.sampling, s.cached)
        self._stretch(s, t0)
        return nxt

    def decode(self, s: Session, token: int) -> int:
        return self.prefill_chunk(s, [token])

    def warmup(self) -> None:
        s = self.new_session()
        self.decode(s, self.prefill_chunk(s, [1, 2, 3]))


class MockDevice:
    """Profile latency: prefill of m new tokens after c cached =
    a + b*m + q*((c+m)^2 - c^2) ms per chunk; decode = tpot_ms per token."""

    def __init__(self, profile: str, vocab_size: int, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        p = load_profile(profile)
        self.name = str(p.get("name", profile))
        pf = p["prefill_ms"]
        self.a, self.b = float(pf["a"]) * scale, float(pf["b"]) * scale
        self.q = float(pf.get("c", 0.0)) * scale
        self.tpot = float(p["tpot_ms"]) * scale
        self.vocab = vocab_size

    def new_session(self, sampling: Sampling | None = None) -> Session:
        return Session(sampling=sampling or Sampling())

    def prefill_ms(self, cached: int, m: int) -> float:
        return self.a + self.b * m + self.q * ((cached + m) ** 2 - cached ** 2)

    def _token(self, s: Session) -> int:
        return 16 + (s.cached * 2654435761) % min(240, max(1, self.vocab - 16))

    def prefill_chunk(self, s: Session, ids: list[int]) -> int:
        ms = self.prefill_ms(s.cached, len(ids))
        time.sleep(ms / 1e3)
        s.cached += len(ids)
        s.compute_ms += ms
        return self._token(s)

    def decode(self, s: Session, token: int) -> int:
        time.sleep(self.tpot / 1e3)
        s.cached += 1
        s.compute_ms += self.tpot
        return self._token(s)

    def warmup(self) -> None:
        return None
