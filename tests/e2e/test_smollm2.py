"""The real model through the real processes: `pdserve up` + `pdserve generate`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.e2e.conftest import UpProcess, start_up
from tests.e2e.test_cluster import generate_ref, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    up = start_up(tmp_path_factory.mktemp("up-smol"), "--model", "smollm2")
    try:
        yield up
    finally:
        up.stop()


def test_pdserve_generate_prints_the_real_answer(smol: UpProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "--address", smol.address, QUESTION],
        capture_output=True, text=True, timeout=300, check=True)
    assert "Paris" in out.stdout
    assert "ttft" in out.stderr and "tpot" in out.stderr  # timings are printed


def test_smollm2_token_identity(smol: UpProcess, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    info = ModelInfo.load("smollm2")
    ids = TextTokenizer(info.path).encode_chat("Name three colors of the rainbow.")
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    assert run(smol.address, prompt_token_ids=ids, max_tokens=24) == generate_ref(model, ids, 24)
