"""Linear layers with their weights reordered once into oneDNN's blocked layout.

A decode step is memory-bound: at 16 streams it reads every weight of SmolLM2 (about
540 MB in fp32) once, and the matrix products take most of the step. ``nn.Linear`` on
CPU runs MKL's sgemm on the plain row-major weight: measured here at 8-10 GB/s for a
``[16, 576] x [576, N]`` product. oneDNN's inner-product primitive with the weight
packed ahead of time (``torch.ops.mkldnn._reorder_linear_weight``, the same op torch's
inductor uses when it freezes a CPU model) reads it at about twice that: the packing
lays each block of rows out in the order the kernel streams it.

The results are the same product up to float rounding (the reduction is blocked
differently: max |diff| ~1e-5 on outputs of magnitude ~20), the same class of
difference as between MKL's own M=1 and M=16 kernels, which the batched path already
has. Greedy output stays token-identical to batch-1 ``generate`` in the tests
(tests/unit/test_batching.py) and in ``bench/engine.py``'s identity check.

``pack_linears`` swaps every ``nn.Linear`` of a model (in place) when oneDNN is
available and the op works on this CPU; otherwise it leaves the model alone.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` (no grad) over a oneDNN-packed copy of the weight."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(
                linear.weight.detach().contiguous(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN"


def packing_available() -> bool:
    """oneDNN is built in and its packed inner product runs on this CPU (fp32)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        lin = torch.nn.Linear(8, 4, bias=False)
        want = lin(torch.ones(2, 8))
        got = PackedLinear(lin, 2)(torch.ones(2, 8))
        return bool(torch.allclose(got, want, atol=1e-5))
    except (RuntimeError, AttributeError) as e:  # an op missing from this torch build
        log.info("oneDNN packed linear unavailable: %s", e)
        return False


def pack_linears(model: torch.nn.Module, batch_hint: int = 16) -> int:
    """Replace every fp32 ``nn.Linear`` in ``model`` by a ``PackedLinear``; returns how many.
    A tied weight (SmolLM2's LM head shares the embedding) gets its own packed copy; the
    embedding keeps the original."""
    if not packing_available():
        return 0
    swaps = [(parent, name, child)
             for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(swaps)
