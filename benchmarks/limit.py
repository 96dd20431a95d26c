"""The machine's matmul limit at a step's own shapes, and the fraction of it a step reaches.

A step's matmuls (every `mm`, `addmm`, `bmm` and `baddbmm` it dispatches, forward and backward) are recorded once,
with their sizes, strides and dtypes, and replayed on fresh tensors with nothing else around them: no Python
modules, no elementwise work, no optimizer. The replay's FLOPs over its time is what this machine's GEMMs deliver
at exactly these shapes; a step's FLOPs over the step's time, divided by that, is the fraction of the limit it
reaches. The FLOPs are those torch's FlopCounterMode counts, which on the CPU are the same four matmul operators
(its fused CPU attention kernel is not counted, so attention is outside both numbers).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .measure import Step

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)


class _MatmulRecorder(TorchDispatchMode):
    """Records every matmul dispatched inside it: (operator, its arguments with tensors as layouts)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            self.calls.append((func, [layout(a) for a in args], {k: layout(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def layout(value):
    """A tensor as (size, stride, dtype, device); anything else as it is."""
    if isinstance(value, torch.Tensor):
        return _Layout(tuple(value.shape), value.stride(), value.dtype, value.device)
    return value


class _Layout(tuple):
    def __new__(cls, size, stride, dtype, device):
        return super().__new__(cls, (size, stride, dtype, device))

    def materialise(self, generator: torch.Generator) -> torch.Tensor:
        size, stride, dtype, device = self
        # the storage a strided view of this size needs (transposed and expanded operands of the backward included)
        extent = 1 + sum((n - 1) * s for n, s in zip(size, stride, strict=True) if n > 0)
        base = torch.randn(extent, generator=generator, dtype=torch.float32).to(device, dtype)
        return base.as_strided(size, stride)


def matmul_replay(step: Step) -> Step:
    """The matmuls `step` runs, recorded from one call of it, replayed on random tensors of the same layouts."""
    recorder = _MatmulRecorder()
    with recorder:
        step()
    generator = torch.Generator().manual_seed(0)

    def real(value):
        return value.materialise(generator) if isinstance(value, _Layout) else value

    calls = [
        (func, [real(a) for a in args], {k: real(v) for k, v in kwargs.items()})
        for func, args, kwargs in recorder.calls
    ]

    def replay():
        with torch.no_grad():
            for func, args, kwargs in calls:
                func(*args, **kwargs)

    return replay


def fraction_of_limit(step_flops: int, step_seconds: float, replay_flops: int, replay_seconds: float) -> float:
    """The step's FLOP/s over its replayed matmuls' FLOP/s."""
    return (step_flops / step_seconds) / (replay_flops / replay_seconds)
