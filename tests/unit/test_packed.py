"""oneDNN-packed linear layers: same products up to float rounding, every nn.Linear
swapped once, and the model's greedy tokens unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine.packed import PackedLinear, pack_linears, packing_available
from services.model.info import ModelInfo

pytestmark = pytest.mark.unit
needs_onednn = pytest.mark.skipif(not packing_available(), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_nn_linear_for_any_batch(bias: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=bias)
    packed = PackedLinear(lin, batch_hint=16)
    with torch.inference_mode():
        for shape in ((1, 96), (16, 1, 96), (1, 37, 96), (3, 5, 96)):
            x = torch.randn(shape)
            assert packed(x).shape == lin(x).shape
            torch.testing.assert_close(packed(x), lin(x), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_pack_linears_swaps_every_linear_once_and_keeps_greedy_tokens() -> None:
    path = ModelInfo.load("tiny").path
    stock = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == 0  # idempotent
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    with torch.inference_mode():
        want = stock.generate(ids, max_new_tokens=12, do_sample=False)
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()
