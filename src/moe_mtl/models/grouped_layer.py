"""Whole-layer experts run as one layer: a batch sorted by expert, each projection and layer norm by its rows' expert.

A mixed-task batch under hard routes sends each example to one of E whole BART layers. Calling each expert's
layer on its own rows costs E layer calls: E times the Python and operator calls of dense, on smaller matmuls. A
`GroupedLayer` is one transformers BART layer (the experts' own class and forward) whose `nn.Linear` and
`nn.LayerNorm` modules are replaced by grouped ones: the batch arrives sorted by expert, and each of them applies
expert e's weights to expert e's contiguous rows. Everything between them (attention, activation, residuals) runs
once on the whole batch, as dense does; attention mixes positions within an example, never across examples, so
sorting the examples changes nothing. The arithmetic of each row is that of its expert's own layer.

Inference only (no gradient, eval mode): each expert's bias is added to its rows in place, which autograd refuses,
and the experts' weights are stacked once for all calls, a copy that training would leave stale.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import flop_registry, register_flop_formula

if torch.ops.aten._grouped_mm not in flop_registry:  # so that FlopCounterMode counts a grouped layer's matmuls

    @register_flop_formula(torch.ops.aten._grouped_mm)
    def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        """Each row of a group times its expert's matrix, once: (M, K) × (E, K, N) or (E, M, K) × (E, K, N) is
        2·K per output element; (K, M) × (M, N) grouped over M (weight gradients) is 2·K·M·N."""
        if len(a_shape) == 2 and len(b_shape) == 2:
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        return 2 * math.prod(out_shape) * a_shape[-1]


def version(tensor: torch.Tensor) -> int | None:
    """The count of in-place changes to `tensor`; None for an inference tensor, which keeps none (and can be
    changed only inside inference mode)."""
    return None if tensor.is_inference() else tensor._version


@dataclass
class ExpertGrouping:
    """A partition's examples sorted by expert: the sort, each sorted example's expert, the examples per expert."""

    order: torch.Tensor  # (B,) batch rows, by expert, in batch order within an expert
    expert: torch.Tensor  # (B,) the expert of each row of the sorted batch, ascending
    counts: list[int]  # (E,)


def group_by_expert(active: torch.Tensor) -> ExpertGrouping:
    """active (B, E): exactly one True per row, its expert."""
    expert = active.to(torch.int8).argmax(-1)
    order = torch.argsort(expert, stable=True)
    return ExpertGrouping(order, expert[order], torch.bincount(expert, minlength=active.shape[-1]).tolist())


def rows_per_example(x: torch.Tensor) -> int:
    """Rows of batch-first x (B, ..., d) flattened to 2-D, per example: its tokens."""
    return x.numel() // (x.shape[0] * x.shape[-1])


class ExpertGroups:
    """The grouping a layer call runs on, shared by its grouped modules; they cannot be handed it, because
    transformers' layer forward gives its projections nothing but tensors. What they derive from it (group
    offsets, each example's bias and scale) is kept while the same grouping comes back, as it does at every
    decoding step of one `generate`."""

    def __init__(self) -> None:
        self.grouping: ExpertGrouping | None = None
        self.active = False  # inside `held`
        self._derived: dict = {}

    @contextlib.contextmanager
    def held(self, grouping: ExpertGrouping) -> Iterator[None]:
        if grouping is not self.grouping:
            self.grouping, self._derived = grouping, {}
        self.active = True
        try:
            yield
        finally:
            self.active = False

    def _current(self) -> ExpertGrouping:
        if not self.active:
            raise RuntimeError("a grouped layer ran outside `ExpertGroups.held`: it needs each example's expert")
        return self.grouping

    def ends(self, x: torch.Tensor) -> list[int]:
        """(E,) the end row of each expert's group in x (B, ..., d) flattened to 2-D (empty groups included)."""
        per_example, ends, end = rows_per_example(x), [], 0
        for count in self._current().counts:
            end += count * per_example
            ends.append(end)
        return ends

    def bounds(self, x: torch.Tensor) -> list[tuple[int, int, int]]:
        """(expert, first row, end row) of each used expert in x flattened to 2-D."""
        ends = [0, *self.ends(x)]
        return [(e, ends[e], ends[e + 1]) for e in range(len(ends) - 1) if ends[e + 1] > ends[e]]

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """`ends` as the int32 tensor grouped matmuls take, kept for the grouping."""
        key = ("offsets", rows_per_example(x), x.device)
        if key not in self._derived:
            self._derived[key] = torch.tensor(self.ends(x), dtype=torch.int32, device=x.device)
        return self._derived[key]

    def per_example(self, stacked: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """stacked (E, d): each example's expert's row, shaped (B, 1, d) to broadcast over x's (B, T, d) tokens."""
        grouping = self._current()
        key = ("rows", id(stacked), x.dim())
        kept = self._derived.get(key)
        if kept is None or kept[0] is not stacked:  # an id is unique only while its tensor lives
            rows = stacked.index_select(0, grouping.expert).view(x.shape[0], *([1] * (x.dim() - 2)), -1)
            kept = self._derived[key] = (stacked, rows)
        return kept[1]


def stack(modules: list[nn.Module], name: str) -> torch.Tensor | None:
    """The experts' parameter `name` stacked (E, ...), detached; None where the modules have none (no bias)."""
    if getattr(modules[0], name) is None:
        return None
    return torch.stack([getattr(m, name).detach() for m in modules])


class GroupedLinear(nn.Module):
    """E experts' copies of one `nn.Linear`; expert e's rows of the sorted batch get expert e's weights.

    Where torch has a grouped matmul for the device and dtype (`F.grouped_mm`: any on the CPU; CUDA's asks for
    bf16 and a recent GPU), one over the experts' weights stacked as (E, d_in, d_out): a copy, made once per dtype
    until `GroupedLayer` sees the weights change, whose contiguous (K, N) layout also runs small row counts up to a
    third faster than `nn.Linear`'s transposed weight on this project's CPU. Elsewhere a matmul per expert into
    its rows, on the experts' own weights (no copy)."""

    def __init__(self, linears: list[nn.Linear], groups: ExpertGroups):
        super().__init__()
        self.__dict__["linears"] = linears  # the experts' own modules, not registered twice
        self.groups = groups
        self.stacks: dict[tuple[str, torch.dtype], torch.Tensor | None] = {}  # (weights or biases, dtype) → stack
        self.without_kernel: set[tuple[str, torch.dtype]] = set()  # where F.grouped_mm refused these shapes

    def stacked(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """ "weight": (E, d_in, d_out); "bias": (E, d_out), or None without biases; in `dtype`."""
        if (name, dtype) not in self.stacks:
            stacked = stack(self.linears, name)
            if stacked is not None and name == "weight":
                stacked = stacked.transpose(1, 2).contiguous()  # (E, d_out, d_in) → (E, d_in, d_out)
            self.stacks[name, dtype] = None if stacked is None else stacked.to(dtype)
        return self.stacks[name, dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        dtype = flat.dtype
        if torch.is_autocast_enabled(flat.device.type):  # what autocast would give F.linear
            dtype = torch.get_autocast_dtype(flat.device.type)
        out = self.matmul(flat.to(dtype), x).view(*x.shape[:-1], -1)
        biases = self.stacked("bias", dtype)
        if biases is not None:  # in place, each example's expert's bias over its tokens
            out.add_(self.groups.per_example(biases, out))
        return out

    def matmul(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """flat (M, d_in), sorted by expert, times each row's expert's weight: (M, d_out)."""
        kernel = getattr(F, "grouped_mm", None)
        where = (flat.device.type, flat.dtype)
        if kernel is not None and where not in self.without_kernel:
            try:
                return kernel(flat, self.stacked("weight", flat.dtype), offs=self.groups.offsets(x))
            except (RuntimeError, NotImplementedError):
                self.without_kernel.add(where)
                self.stacks.pop(("weight", flat.dtype), None)
        out = flat.new_empty(flat.shape[0], self.linears[0].out_features)
        for e, start, end in self.groups.bounds(x):
            torch.mm(flat[start:end], self.linears[e].weight.detach().to(flat.dtype).t(), out=out[start:end])
        return out


class GroupedLayerNorm(nn.Module):
    """E experts' copies of one `nn.LayerNorm` over the sorted batch.

    Each expert's layer norm on its rows, joined; at one token per example (a decoding step), where the calls
    would cost more than the rows, the normalisation once and each example's expert's scale and shift (a
    broadcast multiply-add that is slow on long rows: 7x a fused layer norm at 16 x 64 x 1024 on this CPU)."""

    def __init__(self, norms: list[nn.LayerNorm], groups: ExpertGroups):
        super().__init__()
        self.__dict__["norms"] = norms
        self.groups = groups
        self.stacks: dict[str, torch.Tensor] = {}  # "weight", "bias": (E, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.norms[0]
        if rows_per_example(x) > 1:
            flat = x.reshape(-1, x.shape[-1])
            parts = [
                F.layer_norm(
                    flat[start:end], first.normalized_shape, self.norms[e].weight, self.norms[e].bias, first.eps
                )
                for e, start, end in self.groups.bounds(x)
            ]
            return (torch.cat(parts) if len(parts) > 1 else parts[0]).view(x.shape)
        for name in ("weight", "bias"):
            if name not in self.stacks:
                self.stacks[name] = stack(self.norms, name)
        normalised = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
        scale, shift = (self.groups.per_example(self.stacks[name], x) for name in ("weight", "bias"))
        return torch.addcmul(shift, normalised, scale)


def grouped_copy(modules: list[nn.Module], groups: ExpertGroups) -> nn.Module:
    """One module with the structure and forward of `modules[0]`, whose linears and layer norms are grouped over
    all of `modules` (E copies of one layer); no parameter is copied."""
    first = modules[0]
    if isinstance(first, nn.Linear):
        return GroupedLinear(modules, groups)
    if isinstance(first, nn.LayerNorm):
        if not first.elementwise_affine or first.bias is None:
            raise NotImplementedError("a layer norm without its scale and shift cannot be grouped")
        return GroupedLayerNorm(modules, groups)
    if first._parameters or first._buffers:
        raise NotImplementedError(f"{type(first).__name__} holds parameters of its own: it cannot be grouped")
    shell = copy.copy(first)  # the attributes (config, layer_idx, dropout rates), with modules of its own
    shell._modules = {name: grouped_copy([m._modules[name] for m in modules], groups) for name in first._modules}
    shell._compiled_call_impl = None  # an expert compiled by `compilation.compile_layers`: the copy runs eager
    return shell.train(False)


class GroupedLayer:
    """E whole-layer experts as one layer call on a batch whose rows are sorted by expert (`__call__`)."""

    def __init__(self, experts: list[nn.Module]):
        self.groups = ExpertGroups()
        self.layer = grouped_copy(experts, self.groups)
        self.experts = experts
        self.stacked = [m for m in self.layer.modules() if isinstance(m, GroupedLinear | GroupedLayerNorm)]
        self.versions: list | None = None

    def __call__(self, grouping: ExpertGrouping, *args, **kwargs) -> torch.Tensor:
        """args and kwargs: the layer's inputs, their batch rows sorted by `grouping`."""
        if grouping is not self.groups.grouping:  # a new batch: the steps of one `generate` share their weights
            versions = [(version(p), p.data_ptr()) for expert in self.experts for p in expert.parameters()]
            if versions != self.versions:  # an optimizer step, a loaded state or a move: stack the weights again
                for module in self.stacked:
                    module.stacks.clear()
                self.versions = versions
        with self.groups.held(grouping):
            return self.layer(*args, **kwargs)
