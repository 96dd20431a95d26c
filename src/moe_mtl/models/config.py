"""MoE options and the configuration class of the MoE-BART model.

`MoEOptions` is the one place where every MoE option is defined, validated and documented;
`MoEBartConfig` is a `BartConfig` that carries them (as the dict `moe`) through
`save_pretrained` / `from_pretrained`.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from huggingface_hub.dataclasses import strict
from transformers import BartConfig

from ..errors import UsageError

EXPERT_UNITS = ("layer", "ffn")
ROUTINGS = ("task", "token")
ROUTERS = ("mlp", "lstm", "gru", "transformer")
SELECTIONS = ("softmax", "gumbel", "gumbel_st", "argmax", "switch", "reinforce")
ROUTE_SOURCES = ("learned", "average", "random", "given")
STAGE_ROUTES = ("argmax", "softmax")  # the selections of fixed learned routes (Ye et al.'s stage two)


# options that decide the shape (or the fixed values) of the weights: a saved model or checkpoint decides them
SHAPE_OPTIONS = (
    "num_experts",
    "expert_unit",
    "moe_layers",
    "routing",
    "task_dim",
    "task_embeddings",
    "router",
    "router_hidden",
    "routes",
    "given_routes",
    "route_seed",
)


def fixed_route_options(routes: str) -> dict[str, Any]:
    """The MoE options of learned routes fixed as `routes` ("argmax" or "softmax"): router and task table frozen."""
    return {"selection": routes, "freeze_router": True, "freeze_task_table": True}


def _check_choice(option: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UsageError(f"MoE option `{option}` is {value!r}; allowed values: {', '.join(map(repr, allowed))}")


def _check_positive(option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"MoE option `{option}` is {value!r}; it must be a positive integer")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class MoEOptions:
    """How the BART layers are turned into routed expert banks."""

    num_experts: int = 3
    """Experts per routed layer (E). 1 gives vanilla multi-task BART."""
    expert_unit: Literal["layer", "ffn"] = "layer"
    """"layer": a whole encoder/decoder layer per expert (Ye et al.); "ffn": only the feed-forward block."""
    moe_layers: dict[str, list[int]] | None = None
    """Routed layers per side, e.g. {"encoder": [0, 1], "decoder": [1]}. None routes every layer."""
    num_tasks: int = 1
    """Rows of the task representation table: one per task the model is trained or tested on."""
    routing: Literal["task", "token"] = "task"
    """"task": one route per task and layer (Ye et al.); "token": task-aware token gates (Gupta et al.)."""
    task_dim: int = 128
    """Width of a task representation (ignored when `task_embeddings` gives the vectors)."""
    task_embeddings: str | None = None
    """A task-representation file (`moe-mtl represent`: .pt, .npy or .json), shape (num_tasks, task_dim): the task
    table's initial rows. None: random rows."""
    freeze_task_table: bool = False
    """Keep the task table fixed during training."""
    router: Literal["mlp", "lstm", "gru", "transformer"] = "mlp"
    """Router network from a task representation (a task-table row) to per-layer expert logits ("task" routing)."""
    router_hidden: int = 64
    """Hidden width of the router network."""
    selection: Literal["softmax", "gumbel", "gumbel_st", "argmax", "switch", "reinforce"] = "gumbel_st"
    """Training-time selection. While routes are learned, evaluation uses the hard top-k; once they are fixed
    (`freeze_router`), evaluation uses the training routes. "argmax" uses the hard top-k in training too (no
    router gradient). "switch" (a route per task) and "reinforce" (a route per example) run only the drawn expert
    in training, at dense cost (docs/performance.md); softmax, gumbel and gumbel_st run all E."""
    freeze_router: bool = False
    """The router is fixed (two-stage training's second stage sets this): no gradient, and evaluation, test,
    predict and `generate` route as training does, by selection "argmax" or "softmax" (each task's soft
    mixture softmax(logits/τ), which runs every expert), not by the hard top-k."""
    temperature: float = 1.0
    """Initial selection temperature; callbacks change it during training, checkpoints keep it."""
    top_k: int = 1
    """Experts per route at evaluation ("task") or per token ("token", 1 or 2)."""
    routes: Literal["learned", "average", "random", "given"] = "learned"
    """Where task routes come from: the router, uniform weights, a seeded random expert, or `given_routes`."""
    given_routes: list | None = None
    """routes="given": expert index per task and routed layer (num_tasks × layers), or weights (× E)."""
    route_seed: int = 0
    """Seed of routes="random", and of the random routes of unseen tasks (`transfer.unseen_routes: random`)."""
    capacity_factor: float | None = None
    """Token routing: an expert takes at most ceil(factor · tokens · top_k / E) of the tokens of one
    forward pass (in cached generation: of one decoding step); None: no limit."""

    def __post_init__(self) -> None:
        _check_positive("num_experts", self.num_experts)
        _check_positive("num_tasks", self.num_tasks)
        _check_positive("task_dim", self.task_dim)
        _check_positive("router_hidden", self.router_hidden)
        _check_choice("expert_unit", self.expert_unit, EXPERT_UNITS)
        _check_choice("routing", self.routing, ROUTINGS)
        _check_choice("router", self.router, ROUTERS)
        _check_choice("selection", self.selection, SELECTIONS)
        _check_choice("routes", self.routes, ROUTE_SOURCES)
        top_k_allowed = range(1, min(self.num_experts, 2 if self.routing == "token" else self.num_experts) + 1)
        if isinstance(self.top_k, bool) or self.top_k not in top_k_allowed:
            raise UsageError(
                f"MoE option `top_k` is {self.top_k!r}; allowed values: {', '.join(map(str, top_k_allowed))} "
                f"(num_experts={self.num_experts}, routing={self.routing!r})"
            )
        if self.routing == "token" and self.expert_unit != "ffn":
            raise UsageError(
                f"MoE option `expert_unit` is {self.expert_unit!r}, but routing='token' routes tokens "
                "to feed-forward experts; allowed values with routing='token': 'ffn'"
            )
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise UsageError(f"MoE option `temperature` is {self.temperature!r}; it must be a number > 0")
        if self.capacity_factor is not None:
            if not (_is_number(self.capacity_factor) and self.capacity_factor > 0):
                raise UsageError(
                    f"MoE option `capacity_factor` is {self.capacity_factor!r}; it must be a number > 0 or None"
                )
            if self.routing != "token":
                raise UsageError("MoE option `capacity_factor` applies only to routing='token'; leave it None")
        if self.freeze_router:
            if self.routing != "task" or self.routes != "learned":
                raise UsageError(
                    "MoE option `freeze_router` applies only to learned task routes (routing='task', "
                    "routes='learned'); other routes have no router"
                )
            if self.selection not in ("argmax", "softmax"):
                raise UsageError(
                    f"MoE option `selection` is {self.selection!r}, but a frozen router (`freeze_router`) routes "
                    "evaluation as training does; allowed with freeze_router: 'argmax', 'softmax'"
                )
        if (self.routes == "given") != (self.given_routes is not None):
            raise UsageError("MoE option `given_routes` must be set exactly when routes='given'")
        if self.moe_layers is not None:
            self._check_moe_layers()
        for message in self.unread():
            # said from this line, not the caller's: options are rebuilt several times per run (the module, the
            # config, jsonargparse), and Python says a warning once per line it comes from
            warnings.warn(message, UserWarning, stacklevel=1)

    def unread(self) -> list[str]:
        """What is said of options set away from their defaults that these options never read: a router's options
        without a task router. Said, not refused: a saved run keeps the options it was given. (`route_seed` is read
        without random routes too: it seeds the random routes of unseen tasks, `transfer.unseen_routes`.)"""
        reasons = {}
        if self.routing == "token":
            for option in ("routes", "router", "router_hidden", "selection", "temperature"):
                reasons[option] = "routing='token' has no task router"
        elif self.routes != "learned":
            for option in ("router", "router_hidden", "selection", "temperature"):
                reasons[option] = f"routes={self.routes!r} are fixed, with no router network"
        defaults = {field.name: field.default for field in fields(MoEOptions)}
        return [
            f"MoE option `{option}` is {getattr(self, option)!r}, which does nothing: {reason}; leave it at its "
            f"default, {defaults[option]!r}"
            for option, reason in reasons.items()
            if getattr(self, option) != defaults[option]
        ]

    def _check_moe_layers(self) -> None:
        layers = self.moe_layers
        if not isinstance(layers, dict) or set(layers) - {"encoder", "decoder"}:
            keys = sorted(layers) if isinstance(layers, dict) else type(layers).__name__
            raise UsageError(f"MoE option `moe_layers` has keys {keys}; allowed keys: 'encoder', 'decoder'")
        for side, indices in layers.items():
            if not isinstance(indices, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in indices
            ):
                raise UsageError(f"MoE option `moe_layers`: {side} is {indices!r}; it must be a list of layer indices")
        if not any(layers.values()):
            raise UsageError("MoE option `moe_layers` routes no layer; name at least one encoder or decoder layer")

    def routed_layers(self, side: str, num_layers: int) -> list[int]:
        """Indices of the routed layers of one side ("encoder" or "decoder"), checked against its depth."""
        if self.moe_layers is None:
            return list(range(num_layers))
        layers = sorted(set(self.moe_layers.get(side, [])))
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UsageError(f"MoE option `moe_layers` names {side} layers {bad}; allowed: 0 to {num_layers - 1}")
        return layers

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoEOptions:
        """Build from a dict, naming unknown keys instead of failing on a bare TypeError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown MoE options {unknown}; allowed options: {', '.join(sorted(known))}")
        return cls(**values)


def adopt_saved_shape(configured: MoEOptions, saved: MoEOptions, source: str) -> MoEOptions:
    """The options of a model whose weights come from `source` (a saved MoE-BART, an upstream run): its
    `SHAPE_OPTIONS`, the configured values of the others (selection, temperature, freezing, top_k, …, and
    `route_seed` unless the saved routes are "random").

    A shape option left at its default takes the saved value; one configured to another value must equal
    the saved one (else a ValueError naming it). `num_tasks` stays as configured (the data's).
    """
    defaults = {f.name: f.default for f in fields(MoEOptions)}
    values, saved_values = asdict(configured), asdict(saved)
    for option in SHAPE_OPTIONS:
        if option == "route_seed" and saved.routes != "random":
            continue  # decides no weight here: the configured seed stays (e.g. for random routes of unseen tasks)
        given, kept = values[option], saved_values[option]
        if given != kept and given != defaults[option]:
            raise UsageError(
                f"MoE option `{option}` is {given!r}, but {source} has {kept!r}: it shapes the weights, so it "
                f"must match; leave it unset (or set it to {kept!r})"
            )
        values[option] = kept
    return MoEOptions(**values)


@strict
class MoEBartConfig(BartConfig):
    """A `BartConfig` plus the MoE options (`moe`, the dict form of `MoEOptions`)."""

    model_type = "moe_bart"

    moe: dict | None = None

    def __post_init__(self, **kwargs):
        options = self.moe if isinstance(self.moe, MoEOptions) else MoEOptions.from_dict(self.moe or {})
        self.moe = asdict(options)
        super().__post_init__(**kwargs)

    @property
    def moe_options(self) -> MoEOptions:
        return MoEOptions(**self.moe)

    @classmethod
    def from_bart_config(cls, config: BartConfig, options: MoEOptions) -> MoEBartConfig:
        """The MoE config of a dense BART config: same shape, tokens and generation defaults."""
        return cls(**shape_values(config), moe=options)

    def to_bart_config(self) -> BartConfig:
        """The dense BART config of the same shape, tokens and defaults, without the MoE options (the inverse of
        `from_bart_config`; model_type "bart")."""
        return BartConfig(**shape_values(self))


def shape_values(config: BartConfig) -> dict[str, Any]:
    """A BART config's values without what names its class or version, or the MoE options."""
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "moe"):
        values.pop(key, None)
    return values
