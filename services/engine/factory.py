"""Pick the engine for a model spec: ``mock:<profile>`` is the mock engine (no
torch); anything else is a real model through torch + transformers."""

from __future__ import annotations

from services.engine.base import Runner


def load_runner(spec: str, cache_dir: str = "", threads: int = 0) -> Runner:
    if spec.startswith("mock:"):
        from services.engine.mock import MockRunner

        return MockRunner(spec, cache_dir, threads)
    from services.engine.runner import ModelRunner

    return ModelRunner(spec, cache_dir, threads)
