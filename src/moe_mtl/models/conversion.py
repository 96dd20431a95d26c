"""Every dense ↔ MoE weight map: upcycling a dense BART, per-task weights mapped by task name onto a new task
table (`init_from`), and the per-task export of a MoE-BART to a plain transformers BART (Kudugunta et al. 2021,
Task-MoE).

Upcycling (`load_dense_state_dict`, used by `MoEBartForConditionalGeneration.from_dense`): every MoE weight is
copied from the dense weight of its name without `experts.{e}` (`dense_name`); routing weights are new.

A new run from an upstream one (`load_upstream_weights`): every weight copied by name; the per-task tensors
(first dimension = task id) row by row, each task's row found by its name (`task_row_map`).

Export: a task whose route puts weight 1 on one expert in every routed layer runs exactly one expert per
layer, so for that task the MoE-BART is a dense BART: the non-expert weights plus, in each routed
layer, its chosen expert's weights under the dense names (`dense_name`). This is the inverse of
upcycling (`MoEBartForConditionalGeneration.from_dense`). Soft routes (a mixture of experts) and
token routing have no dense equivalent of the same shape and are refused, naming the task and layer.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from transformers import BartForConditionalGeneration

from ..data.tasks import shortened
from ..errors import UsageError
from .config import MoEOptions

if TYPE_CHECKING:  # moe_bart imports this module (upcycling); the class is only named here
    from .moe_bart import MoEBartForConditionalGeneration

ROUTING_PARAMETERS = re.compile(r"(^|\.)(task_table|router|gate)\.")
EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")

# an expert's weight: the routed layer it is in ("encoder.3") and its expert index
EXPERT_PARAMETER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.experts\.(\d+)\.")
TASK_TABLE_KEY = "model.encoder.task_table.embedding.weight"
# per-task tensors of the model, first dimension = task id: mapped by task name, not copied whole
PER_TASK_WEIGHTS = (
    TASK_TABLE_KEY,
    "model.encoder.router.fixed_routes",
    "model.encoder.router.override_mask",
    "model.encoder.router.override_routes",
)
# of the weights, those the new run's options decide (the configured temperature, not the annealed one)
CONFIGURED_WEIGHTS = ("model.encoder.router.temperature",)
# weights a checkpoint from before they existed lacks; the new model's defaults stand
OPTIONAL_WEIGHTS = ("model.encoder.router.override_mask", "model.encoder.router.override_routes")
# what a dense export takes, for the refusals
ACCEPTED = (
    "a dense export takes hard routes only, weight 1 on one expert in every routed layer: routes 'random', "
    "'given' expert indices, or learned task routes with top_k 1 evaluated by their argmax (stage one, or stage "
    "two with routes 'argmax')"
)


def dense_name(name: str) -> str:
    """The dense BART parameter an MoE parameter is copied from: drop the `experts.{e}` segment."""
    return EXPERT_INDEX.sub(".", name)


# --- upcycling: dense → MoE -------------------------------------------------------------------------------


@torch.no_grad()
def load_dense_state_dict(model: MoEBartForConditionalGeneration, dense_state: Mapping[str, torch.Tensor]) -> None:
    """Copy a dense BART state dict into `model`: name-to-name after dropping `experts.{e}`, shapes asserted.

    Tied weights a safetensors file leaves out (embed_tokens, lm_head) come from their source.
    """
    dense_state = dict(dense_state)
    for target, source in model._tied_weights_keys.items():
        if target not in dense_state and source in dense_state:
            dense_state[target] = dense_state[source]
    used = set()
    for name, tensor in model.state_dict().items():
        source = dense_name(name)
        if source in dense_state:
            if dense_state[source].shape != tensor.shape:
                raise UsageError(
                    f"dense weight {source} has shape {tuple(dense_state[source].shape)}; "
                    f"MoE weight {name} needs {tuple(tensor.shape)}"
                )
            tensor.copy_(dense_state[source])
            used.add(source)
        elif not ROUTING_PARAMETERS.search(name):
            raise UsageError(f"MoE weight {name} has no dense counterpart {source}")
    unused = sorted(set(dense_state) - used)
    if unused:
        raise UsageError(f"dense weights not used by the MoE model: {unused[:5]} ({len(unused)} in all)")


# --- a new task table from an upstream run: MoE → MoE, rows by task name ----------------------------------


def task_row_map(upstream_names: Sequence[str], names: Sequence[str], trained: Sequence[str]) -> list[int | None]:
    """For each task of `names`, its row in the upstream table if the upstream run trained on it, else None."""
    index = {name: i for i, name in enumerate(upstream_names)}
    trained_set = set(trained)
    return [index[name] if name in trained_set else None for name in names]


@torch.no_grad()
def load_upstream_weights(
    model: MoEBartForConditionalGeneration,
    source: Mapping[str, torch.Tensor],
    rows: Sequence[int | None],
    upstream: str = "the upstream run",
) -> None:
    """Copy the upstream weights `source` (named as in `model`) into `model`, name by name; per-task tensors row
    by row (`rows[i]`: the upstream row of task i, None: left as the new model has it). A missing, extra or
    differently shaped weight is an error naming it and `upstream` (the upstream run, in words)."""
    target = model.state_dict()
    extra = sorted(set(source) - set(target))
    if extra:
        raise UsageError(f"{upstream} has weights the new model lacks: {shortened(extra)}")
    missing = sorted(set(target) - set(source) - set(OPTIONAL_WEIGHTS))
    if missing:
        raise UsageError(f"{upstream} lacks weights of the new model: {shortened(missing)}")
    mapped = [(new, old) for new, old in enumerate(rows) if old is not None]
    new_ids = torch.tensor([new for new, _ in mapped], dtype=torch.long)
    old_ids = torch.tensor([old for _, old in mapped], dtype=torch.long)
    for name, weight in target.items():
        if name in CONFIGURED_WEIGHTS or name not in source:
            continue
        value = source[name]
        per_task = name in PER_TASK_WEIGHTS
        if (value.shape[1:] if per_task else value.shape) != (weight.shape[1:] if per_task else weight.shape):
            raise UsageError(
                f"weight {name} has shape {tuple(value.shape)} in {upstream} and {tuple(weight.shape)} "
                "in the new model; the architecture options (bart sizes, pretrained, MoE shape options) must match"
            )
        if per_task:
            weight[new_ids] = value[old_ids].to(weight.dtype)
        else:
            weight.copy_(value)


# --- export: MoE → dense, one task ------------------------------------------------------------------------


def soft_route_cause(options: MoEOptions, overridden: bool) -> str:
    """Why a task's evaluation route can mix experts, in the words of the option that does it."""
    if overridden:
        return "the task has a route override (`set_route_overrides`) that mixes experts"
    if options.routes == "average":
        return "routes 'average' give every expert weight 1/E"
    if options.routes == "given":
        return "`given_routes` gives this task route weights, not one expert index"
    if options.top_k > 1:
        return f"top_k {options.top_k} mixes the top experts"
    if options.freeze_router and options.selection == "softmax":
        return "a frozen router with selection 'softmax' (stage two with routes 'softmax') mixes every expert"
    return "the routes are soft"


def hard_experts(routes: torch.Tensor, layer_names: Sequence[str], task: str, cause: str) -> dict[str, int]:
    """Routed layer name → the one expert a task uses, from its route weights `routes` (L, E).

    A ValueError names the task and the first layer whose weights are not exactly one-hot (weight 1 on one
    expert): such a layer computes a weighted sum of experts, which no single BART layer of this shape equals.
    """
    if routes.shape[0] != len(layer_names):
        raise UsageError(f"routes of task {task!r} have {routes.shape[0]} layers; the model routes {len(layer_names)}")
    experts = {}
    for layer, weights in zip(layer_names, routes.float().cpu(), strict=True):
        active = weights.nonzero().flatten().tolist()
        if len(active) != 1 or weights[active[0]].item() != 1.0:
            mixed = ", ".join(f"expert {e} at {weights[e].item():.3g}" for e in active)
            raise UsageError(f"task {task!r}: routed layer {layer} weights {mixed} ({cause}); {ACCEPTED}")
        experts[layer] = active[0]
    return experts


def dense_state_dict(moe_state: Mapping[str, torch.Tensor], experts: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """The dense BART state dict of one task: every non-routing weight, and of each routed layer only the weights
    of its expert `experts[layer]`, named as in dense BART (`dense_name` drops `experts.{e}`)."""
    dense = {}
    for name, tensor in moe_state.items():
        if ROUTING_PARAMETERS.search(name):  # task table, router, token gates: a dense model has no routing
            continue
        match = EXPERT_PARAMETER.match(name)
        if match is not None:
            layer = f"{match[1]}.{match[2]}"
            if layer not in experts:
                raise UsageError(f"MoE weight {name} is in routed layer {layer}, for which no expert was chosen")
            if int(match[3]) != experts[layer]:
                continue
        dense[dense_name(name)] = tensor
    return dense


@torch.no_grad()
def evaluation_routes(model: MoEBartForConditionalGeneration, task_ids: torch.Tensor) -> torch.Tensor | None:
    """The routes (T, L, E) the model evaluates the tasks `task_ids` (T,) by (in eval mode, whatever its mode
    now); None under token routing (no task-level route)."""
    training = model.training
    model.eval()
    try:
        routes, _ = model.model.encoder.route(task_ids.to(model.device))
    finally:
        model.train(training)
    return routes


def task_experts(model: MoEBartForConditionalGeneration, task_id: int, task: str | None = None) -> dict[str, int]:
    """Routed layer name → the expert task `task_id` (named `task` in errors) runs in evaluation; a ValueError
    if its route mixes experts anywhere or the model routes tokens."""
    task = task if task is not None else f"task id {task_id}"
    layers = model.routed_layer_names
    if model.router is None:
        raise UsageError(
            f"task {task!r}: routing 'token' picks experts per token in every routed layer ({', '.join(layers)}), "
            f"so no single expert serves the task; {ACCEPTED}"
        )
    routes = evaluation_routes(model, torch.tensor([task_id]))[0]
    overridden = bool(model.router.override_mask[task_id])
    return hard_experts(routes, layers, task, soft_route_cause(model.moe_options, overridden))


def dense_model(model: MoEBartForConditionalGeneration, experts: Mapping[str, int]) -> BartForConditionalGeneration:
    """A `BartForConditionalGeneration` with the MoE's weights and, in each routed layer, expert `experts[layer]`;
    the MoE's generation config, device and dtype; in eval mode."""
    config = model.config.to_bart_config()
    config._attn_implementation = model.config._attn_implementation  # as `from_dense` does, the other way
    dense = BartForConditionalGeneration(config)
    state = dense_state_dict(model.state_dict(), experts)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"dense BART weights missing from the export: {missing[:5]}; left over: {unexpected[:5]}")
    dense.generation_config = copy.deepcopy(model.generation_config)
    return dense.to(device=model.device, dtype=model.dtype).eval()


def export_task(
    model: MoEBartForConditionalGeneration, task_id: int, task: str | None = None
) -> BartForConditionalGeneration:
    """The dense BART that computes what `model` computes in evaluation for task `task_id` (see `task_experts`)."""
    return dense_model(model, task_experts(model, task_id, task))
