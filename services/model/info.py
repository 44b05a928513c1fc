"""Torch-free model facts: where a model's files live, its limits, its tokenizer.

The gateway uses this to tokenize, apply the chat template, validate requests
and detokenize, without importing torch. Loading only reads: preparing (converting) the
built-in ``tiny`` and ``smollm2`` models is an explicit step, ``pdserve model prepare``
(``services.engine.prepare``, which needs torch), taken by the launcher, the CLI, compose's
init container and the test session.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import DEFAULT_CACHE_DIR, ConfigError, env_str
from services.model.profile import profile_path

KNOWN = {"tiny": "tiny-llama-v2", "smollm2": "smollm2-135m-instruct-v1"}
FINGERPRINT_FILE = "pdserve-fingerprint.txt"


def cache_root(cache_dir: str = "") -> Path:
    root = cache_dir or env_str("CACHE_DIR") or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def model_dir(spec: str, cache_dir: str = "") -> Path:
    """Resolve a model spec to a directory; a built-in model must have been prepared."""
    if spec in KNOWN:
        path = cache_root(cache_dir) / "models" / KNOWN[spec]
        if not (path / "config.json").exists():
            raise ConfigError(
                f"model {spec!r} is not prepared in {path.parent}: run "
                f"`pdserve model prepare --model {spec}` first")
        return path
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"unknown model {spec!r}: expected 'smollm2', 'tiny', or a local Hugging Face "
            "checkpoint directory containing config.json"
        )
    return path


def fingerprint(path: Path) -> str:
    """Identity of the weights: cached by prepare, else crc32 over the weight files."""
    cached = path / FINGERPRINT_FILE
    if cached.exists():
        return cached.read_text().strip()
    return compute_fingerprint(path)


def compute_fingerprint(path: Path) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    for w in weights:
        crc = 0
        with open(w, "rb") as f:
            while chunk := f.read(16 << 20):
                crc = zlib.crc32(chunk, crc)
        h.update(f"{w.name}:{w.stat().st_size}:{crc}".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str

    @staticmethod
    def load(spec: str, cache_dir: str = "") -> ModelInfo:
        if spec.startswith("mock:"):
            return ModelInfo._mock(spec, cache_dir)
        path = model_dir(spec, cache_dir)
        cfg: dict[str, Any] = json.loads((path / "config.json").read_text())
        gen_path = path / "generation_config.json"
        gen: dict[str, Any] = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        return ModelInfo(
            name=spec if spec in KNOWN else path.name,
            path=path,
            vocab_size=int(cfg["vocab_size"]),
            max_context=int(cfg.get("max_position_embeddings", 2048)),
            eos_token_ids=eos_ids,
            num_layers=int(cfg["num_hidden_layers"]),
            num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=head_dim,
            kv_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
        )

    @staticmethod
    def _mock(spec: str, cache_dir: str) -> ModelInfo:
        """A modelled model (mock engine): shapes and limits from the profile; the byte-level
        tokenizer of ``tiny`` so text prompts and mock tokens are printable."""
        prof = json.loads(profile_path(spec.removeprefix("mock:")).read_text())
        m = prof["model"]
        return ModelInfo(
            name=spec, path=model_dir("tiny", cache_dir), vocab_size=int(m["vocab_size"]),
            max_context=int(m["max_context"]), eos_token_ids=(),
            num_layers=int(m["num_layers"]), num_kv_heads=int(m["num_kv_heads"]),
            head_dim=int(m["head_dim"]), kv_dtype=str(m["kv_dtype"]))
