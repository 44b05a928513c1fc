"""Prompt refinement: selection rule, and the probe against eager attention weights."""

from __future__ import annotations

import pytest
import torch

from services.engine.refine import ImportanceProbe, RefineConfig, refine, select


def test_select_keeps_head_tail_then_most_important() -> None:
    imp = [0.0] * 20
    imp[10], imp[12] = 5.0, 3.0
    cfg = RefineConfig(head=2, tail=3)
    assert select(imp, 0.35, cfg) == [0, 1, 10, 12, 17, 18, 19]  # ceil(0.35*20) = 7
    assert select(imp, 1.0, cfg) == list(range(20))
    assert select(imp, 0.1, cfg) == [18, 19]  # the tail comes first when space is short


def test_select_rejects_bad_ratio() -> None:
    with pytest.raises(ValueError):
        select([1.0], 0.0)
    with pytest.raises(ValueError):
        select([1.0], 1.5)


def test_refine_without_importance_keeps_order() -> None:
    ids = list(range(100, 200))
    out = refine(ids, None, 0.5, RefineConfig(head=4, tail=8))
    assert len(out) == 50 and out == sorted(out)
    assert out[:4] == ids[:4] and out[-8:] == ids[-8:]


def test_probe_matches_eager_attention() -> None:
    from transformers import AutoModelForCausalLM

    from services.model.info import ModelInfo

    path = ModelInfo.load("tiny").path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = torch.tensor([[(7 * i) % 200 + 3 for i in range(40)]])
    cfg = RefineConfig(window=5, layers=2)
    probe = ImportanceProbe(model, cfg)
    with torch.inference_mode():
        out = probe.wrap(lambda: model(input_ids=ids, use_cache=True,
                                       output_attentions=True))()
        scores = probe.scores(out.past_key_values)
    assert scores is not None
    # Reference: the eager attention probabilities of the window's queries, last 2 layers.
    ref = torch.stack([a[0, :, -5:, :].mean(dim=(0, 1)) for a in out.attentions[-2:]]).mean(0)
    assert torch.allclose(torch.tensor(scores), ref, atol=1e-5)
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)
