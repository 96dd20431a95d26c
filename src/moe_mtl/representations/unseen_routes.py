"""Routes of unseen tasks: tasks a trained model has no trained task-table row for (Ye et al. 2022, §6).

Sources (model option `transfer.unseen_routes`; their representations: `transfer.representation`, a kind of the
model's own encoder, `text:<encoder folder>`, or a file):
    representation  the task's representation (text, Fisher, or from a file) as its task-table row, through the
                    trained router: meaningful when the table was trained on representations of that kind.
    nearest         the row of the seen task nearest by cosine similarity of representations (so the router gives
                    it the same route).
    average         uniform weights over the experts of every routed layer (a route override; token routing: the
                    mean of the seen rows).
    random          a seeded random choice of `top_k` experts per routed layer, weight 1/top_k each (an override).
    learned         a new row, the mean of the seen rows, trained on the task's (k-shot) data.

The math is in pure functions of tensors; `assign_unseen_routes` applies a source to a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from ..data.tasks import shortened
from ..errors import UsageError
from ..models import MoEBartForConditionalGeneration
from .compute import REPRESENTATION_KINDS, compute_representations
from .files import load_representations

UNSEEN_ROUTES = ("representation", "nearest", "average", "random", "learned")
# sources that need task representations
NEEDS_REPRESENTATIONS = ("representation", "nearest")
# width of the representations "nearest" compares: text in its native width (d_model), Fisher sketched (its native
# width is every weight of the model, per task)
NEAREST_WIDTH = {"text": None, "fisher": 1024}
# `transfer.representation: text:<folder>`: text representations from a local encoder folder, not the model's own
ENCODER_PREFIX = "text:"


def representation_encoder(representation: str) -> str | None:
    """The encoder folder of a representation option `text:<folder>` (e.g. all-MiniLM-L6-v2's,
    `pretrained.minilm_folder`); None for a kind of the model's own ("text", "fisher") or a file."""
    if representation.startswith(ENCODER_PREFIX) and not Path(representation).is_file():
        return representation[len(ENCODER_PREFIX) :]
    return None


def nearest_rows(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Index (U,) of the row of `keys` (S, d) nearest to each row of `queries` (U, d) by cosine similarity;
    ties go to the lowest index."""
    similarity = F.normalize(queries.double(), dim=-1) @ F.normalize(keys.double(), dim=-1).T  # (U, S)
    return similarity.argmax(-1)


def average_routes(num_tasks: int, num_layers: int, num_experts: int) -> torch.Tensor:
    """Uniform route weights (num_tasks, L, E)."""
    return torch.full((num_tasks, num_layers, num_experts), 1.0 / num_experts)


def random_routes(num_tasks: int, num_layers: int, num_experts: int, seed: int, k: int = 1) -> torch.Tensor:
    """Route weights (num_tasks, L, E): per task and layer `k` distinct experts drawn uniformly (seeded), 1/k each
    (k=1: one expert, the paper's task-level random routes; k=2: its "random2")."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tasks, num_layers, num_experts, generator=generator)
    chosen = scores.topk(k, dim=-1).indices
    return torch.zeros(num_tasks, num_layers, num_experts).scatter(-1, chosen, 1.0 / k)


def check_source(unseen_routes: str, representation: str, routing: str) -> None:
    """Options of the unseen routes: a known source; a representation kind, an encoder folder (`text:<folder>`)
    or an existing file; and a source the routing supports (token routing has no task router: no route override)."""
    if unseen_routes not in UNSEEN_ROUTES:
        raise UsageError(
            f"model option `transfer.unseen_routes` is {unseen_routes!r}; allowed: {', '.join(UNSEEN_ROUTES)}"
        )
    encoder = representation_encoder(representation)
    if encoder is not None and not (Path(encoder) / "config.json").is_file():
        missing = "does not exist" if not Path(encoder).is_dir() else "has no config.json (not a model folder)"
        raise UsageError(
            f"model option `transfer.representation` is {representation!r}: the encoder folder {encoder!r} {missing}; "
            f"give {ENCODER_PREFIX}<a local Hugging Face encoder folder>, e.g. all-MiniLM-L6-v2's "
            "(moe_mtl.representations.pretrained.minilm_folder)"
        )
    if encoder is None and representation not in REPRESENTATION_KINDS and not Path(representation).is_file():
        raise UsageError(
            f"model option `transfer.representation` is {representation!r}: neither a kind "
            f"({', '.join(REPRESENTATION_KINDS)}), an encoder folder ({ENCODER_PREFIX}<folder>) nor an existing "
            "representation file"
        )
    if routing == "token" and unseen_routes == "random":
        raise UsageError(
            "model option `transfer.unseen_routes` is 'random', but token routing (moe.routing='token') has no task "
            "routes to fix; allowed with token routing: representation, nearest, average, learned"
        )


@torch.no_grad()
def assign_unseen_routes(
    model: MoEBartForConditionalGeneration,
    unseen: Sequence[int],
    seen: Sequence[int],
    source: str,
    *,
    seen_rows: torch.Tensor,
    representations: torch.Tensor | None = None,
    seed: int = 0,
    task_names: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Give the tasks `unseen` (ids of `model`'s table) a route from `source`.

    seen: ids of the tasks whose row is trained (candidates of "nearest").
    seen_rows: the trained rows (S', d) whose mean starts "learned" rows (and is the token-routing "average").
    representations: (T, d) vectors of every task id (rows of tasks not in `unseen` or `seen` are not read);
        needed by "representation" and "nearest".
    Returns, for "nearest", unseen task name → [nearest seen task name] (for the log); else {}.
    """
    unseen, seen = list(unseen), list(seen)
    names = list(task_names) if task_names is not None else [f"task{i}" for i in range(model.task_table.num_tasks)]
    if not unseen:
        return {}
    table, router = model.task_table.embedding.weight, model.router
    ids = torch.tensor(unseen, dtype=torch.long)
    if source in NEEDS_REPRESENTATIONS and representations is None:
        raise UsageError(f"unseen routes {source!r} need task representations")
    if source in ("representation", "learned") and router is not None and not router.learned:
        raise UsageError(
            f"unseen routes {source!r} give a task-table row, but the routes are fixed (moe.routes="
            f"{model.moe_options.routes!r}), not computed from rows; allowed: nearest, average, random"
        )
    if source == "representation":
        vectors = representations[ids]
        if vectors.shape[1] != table.shape[1]:
            raise UsageError(
                f"unseen routes 'representation': the representations have width {vectors.shape[1]}, the task table "
                f"task_dim={table.shape[1]}; use representations of the kind and width the table was trained with"
            )
        table[ids] = vectors.to(table.dtype)
        return {}
    if source == "nearest":
        if not seen:
            raise UsageError("unseen routes 'nearest': no task of the data has a trained row to copy")
        keys = torch.tensor(seen, dtype=torch.long)
        nearest = keys[nearest_rows(representations[ids].float(), representations[keys].float())]
        table[ids] = table[nearest]
        if router is not None:  # the seen task's fixed route and route override go with its row
            if not router.learned:
                router.fixed_routes[ids] = router.fixed_routes[nearest]
            router.override_routes[ids] = router.override_routes[nearest]
            router.override_mask[ids] = router.override_mask[nearest]
        return {names[u]: [names[n]] for u, n in zip(unseen, nearest.tolist(), strict=True)}
    if source == "learned" or (source == "average" and router is None):
        if len(seen_rows) == 0:
            raise UsageError(f"unseen routes {source!r}: the upstream run has no trained rows to average")
        table[ids] = seen_rows.float().mean(0).to(table.dtype)
        return {}
    if router is None:
        raise UsageError(f"unseen routes {source!r} need task routing (moe.routing='task')")
    layers, experts = router.num_layers, router.num_experts
    if source == "average":
        routes = average_routes(len(unseen), layers, experts)
    else:
        routes = random_routes(len(unseen), layers, experts, seed, router.top_k)
    router.set_route_overrides(ids, routes)
    return {}


def representations_of_tasks(
    representation: str,
    task_names: Sequence[str],
    datamodule,
    model: MoEBartForConditionalGeneration,
    tokenizer,
    source: str,
) -> torch.Tensor:
    """(T, d) representations of the tasks `task_names` (task-id order) for the unseen-route `source`: read from a
    representation file (which must hold exactly these tasks), or computed by `representations.compute` from the
    tasks of `datamodule` ("text", "fisher": with the model's own encoder and the run's tokenizer; `text:<folder>`:
    with the folder's encoder and tokenizer), cached in `<data output_dir>/representations`: of the table's width
    `task_dim` for "representation" (the reduction is a fixed projection, as in the files `moe-mtl represent`
    writes), of `NEAREST_WIDTH` for "nearest"."""
    encoder = representation_encoder(representation)
    if encoder is None and representation not in REPRESENTATION_KINDS:
        return load_representations(representation, task_names)
    if datamodule is None:
        raise UsageError(
            f"representation {representation!r} of unseen tasks is computed from the data module's tasks: run "
            "under a Trainer with the data module, or give a representation file"
        )
    if list(datamodule.task_names) != list(task_names):
        raise UsageError(
            f"the data module's tasks ({shortened(datamodule.task_names)}) differ from the model's "
            f"({shortened(list(task_names))})"
        )
    hp = datamodule.hparams
    kind = "text" if encoder is not None else representation
    own = {"model": model, "tokenizer": tokenizer} if encoder is None else {"encoder": encoder}
    return compute_representations(
        kind,
        datamodule.tasks,
        **own,
        dim=model.moe_options.task_dim if source == "representation" else NEAREST_WIDTH[kind],
        cache_dir=Path(hp.output_dir) / "representations",
        max_input_length=hp.max_input_length,
        max_target_length=hp.max_target_length,
        fewshot_seed=hp.fewshot_seed,
    )


def describe(assigned: dict[str, list[str]]) -> str:
    return shortened([f"{task} → {nearest[0]}" for task, nearest in assigned.items()])


@dataclass
class UnseenTasks:
    """The tasks of a new run that its upstream run did not train on, and what their routes are chosen from.

    unseen, seen: task ids of the new run's table; seen_rows: the upstream run's trained rows (S', d); seed: of
    "random" routes."""

    unseen: list[int]
    seen: list[int]
    seen_rows: torch.Tensor
    seed: int

    def assign(
        self,
        model: MoEBartForConditionalGeneration,
        source: str,
        representation: str,
        task_names: Sequence[str],
        datamodule=None,
        tokenizer=None,
    ) -> None:
        """Route the unseen tasks by `source` (`assign_unseen_routes`); computed representations ("text", "fisher",
        `text:<folder>`) need the data module's tasks (and the run's tokenizer, but for a folder's encoder), a
        representation file neither."""
        vectors = None
        if source in NEEDS_REPRESENTATIONS and self.unseen:
            vectors = representations_of_tasks(representation, task_names, datamodule, model, tokenizer, source)
        nearest = assign_unseen_routes(
            model,
            self.unseen,
            self.seen,
            source,
            seen_rows=self.seen_rows,
            representations=vectors,
            seed=self.seed,
            task_names=task_names,
        )
        if nearest:
            rank_zero_info(f"unseen tasks take the route of the nearest trained task: {describe(nearest)}")


__all__ = [
    "NEEDS_REPRESENTATIONS",
    "UNSEEN_ROUTES",
    "UnseenTasks",
    "assign_unseen_routes",
    "average_routes",
    "check_source",
    "nearest_rows",
    "random_routes",
    "representation_encoder",
    "representations_of_tasks",
]
