"""Per-task export of a MoE-BART to a plain transformers BART (Kudugunta et al. 2021, Task-MoE).

A task whose route puts weight 1 on one expert in every routed layer runs exactly one expert per
layer, so for that task the MoE-BART is a dense BART: the non-expert weights plus, in each routed
layer, its chosen expert's weights under the dense names (`dense_name`). This is the inverse of
upcycling (`MoEBartForConditionalGeneration.from_dense`). Soft routes (a mixture of experts) and
token routing have no dense equivalent of the same shape and are refused, naming the task and layer.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence

import torch
from transformers import BartForConditionalGeneration

from ..errors import UsageError
from .config import MoEOptions
from .moe_bart import ROUTING_PARAMETERS, MoEBartForConditionalGeneration, dense_name

# an expert's weight: the routed layer it is in ("encoder.3") and its expert index
EXPERT_PARAMETER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.experts\.(\d+)\.")
# what a dense export takes, for the refusals
ACCEPTED = (
    "a dense export takes hard routes only, weight 1 on one expert in every routed layer: routes 'random', "
    "'given' expert indices, or learned task routes with top_k 1 evaluated by their argmax (stage one, or stage "
    "two with routes 'argmax')"
)


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
