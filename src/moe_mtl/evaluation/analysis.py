"""Route-table analysis: entropies, expert utilisation, a heatmap image and a JSON record of the routes.

A route table `routes` (T, L, E) holds, for each of T tasks and L routed layers, a probability
distribution over E experts. Everything here is a pure function of it, for the TensorBoard monitor
and the learning-dynamics plots; nothing needs matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_files import atomic_path
from ..errors import UsageError

# viridis sampled at 0, 1/7, …, 1 (R's `viridis(8)`); linear interpolation between them is visually viridis
VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84],
        [70, 51, 126],
        [54, 92, 141],
        [39, 127, 142],
        [31, 161, 135],
        [74, 193, 109],
        [159, 218, 58],
        [253, 231, 37],
    ],
    dtype=np.float64,
)
SEPARATOR_RGB = (255, 255, 255)  # the column between layer groups of the heatmap
RECORD_DECIMALS = 6  # float32 routes carry ~7 significant digits; more would only be noise in the JSON


def _check_routes(routes: torch.Tensor) -> None:
    # an empty axis would make the task mean 0/0 and the heatmap a zero-width image
    if not isinstance(routes, torch.Tensor) or routes.dim() != 3 or routes.numel() == 0:
        got = tuple(routes.shape) if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise UsageError(f"routes: expected a non-empty (tasks, layers, experts) tensor, got shape {got}")


def _task_distribution(task_weights: torch.Tensor | None, routes: torch.Tensor) -> torch.Tensor:
    """Task weights (T,) normalised to sum to 1 (uniform when None), fp32 on the routes' device."""
    num_tasks = routes.shape[0]
    if task_weights is None:
        return torch.full((num_tasks,), 1.0 / num_tasks, device=routes.device)
    if task_weights.shape != (num_tasks,):
        raise UsageError(
            f"task_weights: expected shape ({num_tasks},) to match routes {tuple(routes.shape)}, "
            f"got {tuple(task_weights.shape)}"
        )
    weights = task_weights.to(device=routes.device, dtype=torch.float32)
    if (weights < 0).any() or weights.sum() <= 0:
        raise UsageError(f"task_weights: expected non-negative weights with a positive sum, got {weights.tolist()}")
    return weights / weights.sum()


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension; xlogy makes 0·log 0 = 0, so one-hot routes give 0, not NaN."""
    return -torch.xlogy(probs, probs).sum(-1)


def expert_utilisation(routes: torch.Tensor, task_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Share of routing mass each expert gets at each layer: the (weighted) mean route over tasks.

    routes (T, L, E), task_weights (T,) non-negative or None for uniform → (L, E), rows sum to 1.
    """
    _check_routes(routes)
    weights = _task_distribution(task_weights, routes)
    return torch.einsum("t,tle->le", weights, routes.float())


def route_entropy(routes: torch.Tensor, task_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer route entropies in nats: (mean over tasks of each task's entropy, entropy of the mean route).

    routes (T, L, E), task_weights (T,) non-negative or None for uniform → two (L,) tensors.
    A low first value means each task commits to few experts; a high second value means the tasks
    together still spread over many. Their difference is the mutual information I(task; expert),
    i.e. how much the expert choice depends on the task.
    """
    _check_routes(routes)
    weights = _task_distribution(task_weights, routes)
    per_task = torch.einsum("t,tl->l", weights, _entropy(routes.float()))
    return per_task, _entropy(expert_utilisation(routes, task_weights))


def viridis(values: np.ndarray) -> np.ndarray:
    """Viridis-like colours of `values` clipped to [0, 1] (NaN drawn as 0) → uint8 RGB of shape values.shape + (3,)."""
    scaled = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0), 0.0, 1.0)
    scaled = scaled * (len(VIRIDIS_ANCHORS) - 1)
    # the last segment takes 1.0 so that it interpolates to the final anchor instead of indexing past it
    lower = np.minimum(np.floor(scaled).astype(np.int64), len(VIRIDIS_ANCHORS) - 2)
    frac = (scaled - lower)[..., None]
    rgb = VIRIDIS_ANCHORS[lower] * (1.0 - frac) + VIRIDIS_ANCHORS[lower + 1] * frac
    return np.rint(rgb).astype(np.uint8)


def route_heatmap(routes: torch.Tensor, cell: int = 8) -> np.ndarray:
    """The route table as a CHW uint8 RGB image, for `SummaryWriter.add_image(..., dataformats="CHW")`.

    Rows are tasks; columns are (layer, expert) pairs, layer-major; each value is a `cell`×`cell`
    block coloured by `viridis`, and a 1-pixel white column separates consecutive layers.
    Shape (3, H, W) with H = T·cell and W = L·E·cell + (L − 1).
    """
    _check_routes(routes)
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise UsageError(f"cell: expected a positive int (pixels per route value), got {cell!r}")
    num_tasks, num_layers, _ = routes.shape
    colours = viridis(routes.detach().float().cpu().numpy())  # (T, L, E, 3)
    blocks = colours.repeat(cell, axis=0).repeat(cell, axis=2)  # (T·cell, L, E·cell, 3)
    separator = np.broadcast_to(np.array(SEPARATOR_RGB, dtype=np.uint8), (num_tasks * cell, num_layers, 1, 3))
    # a separator after every layer, then drop the last one: only the gaps between layers get one
    image = np.concatenate([blocks, separator], axis=2).reshape(num_tasks * cell, -1, 3)[:, :-1]
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def route_table_record(
    routes: torch.Tensor, task_names: Sequence[str], layer_names: Sequence[str], step: int
) -> dict[str, Any]:
    """A JSON-ready record of the route table at a training step.

    {"step", "tasks", "layers", "num_experts", "routes": T×L×E nested lists of floats rounded to 6 decimals}.
    """
    _check_routes(routes)
    num_tasks, num_layers, num_experts = routes.shape
    for option, names, expected, axis in (
        ("task_names", task_names, num_tasks, "tasks"),
        ("layer_names", layer_names, num_layers, "layers"),
    ):
        if len(names) != expected:
            raise UsageError(
                f"{option}: got {len(names)} names, expected {expected} for routes of shape "
                f"{tuple(routes.shape)} ({expected} {axis})"
            )
    values = routes.detach().float().cpu().tolist()
    return {
        "step": int(step),
        "tasks": [str(name) for name in task_names],
        "layers": [str(name) for name in layer_names],
        "num_experts": num_experts,
        "routes": [[[round(p, RECORD_DECIMALS) for p in layer] for layer in task] for task in values],
    }


def write_route_table(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path`, creating its folder; atomic, so a reader never sees half a file."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(record), encoding="utf-8")
