"""Task-level routing (Ye et al. 2022): task table → router network → expert selection.

Shapes: U unique tasks in a batch, L routed layers (encoder then decoder), E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .config import MoEOptions

# set on the task table's and router's modules: the model initialises them by PyTorch's rule, not by BART's
TORCH_INIT = "keeps_torch_init"
GUMBEL_EPS = 1e-6  # clamp of the uniform draw: gumbel noise stays finite in fp16 and on every backend


def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard Gumbel noise in fp32, clamped so that it is never ±inf."""
    uniform = torch.rand(shape, device=device, dtype=torch.float32).clamp(GUMBEL_EPS, 1.0 - GUMBEL_EPS)
    return -torch.log(-torch.log(uniform))


def hard_top_k(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Evaluation routes: weight 1 on the argmax (k=1), or a softmax renormalised over the top k."""
    if k == 1:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    top = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits)
    return weights.scatter(-1, top.indices, top.values.softmax(-1))


SPARSE_SELECTIONS = ("switch", "reinforce")
"""Selections that run only the sampled expert in training: routes drawn from softmax(x/τ)."""


@dataclass
class RouteSample:
    """The routes of one forward pass, and what training needs to know about them."""

    weights: torch.Tensor  # (B, L, E)
    log_prob: torch.Tensor | None = None  # (B,) reinforce: log π of each example's sampled routes, summed over layers
    run_all: bool = False  # every expert runs on every row: the weights' gradient reaches their zero entries


def sample_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """A one-hot sample from softmax(logits) by the Gumbel-max trick (fp32 noise)."""
    choice = (logits.float() + gumbel_noise(logits.shape, logits.device)).argmax(-1)
    return F.one_hot(choice, logits.shape[-1]).to(logits.dtype)


def sparse_select(logits: torch.Tensor, selection: str, temperature) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training routes that run one expert per example and layer: a sample e ~ π = softmax(x/τ), as weights
    (..., E) whose forward value is one-hot, and for "reinforce" log π(e) (...,) summed over the last-but-one
    (layer) dimension.

    switch (after Fedus et al.'s Switch Transformer, which scales the chosen expert by its probability): the weight
    π_e / sg(π_e), 1 in the forward pass, so the router's gradient is ⟨∂L/∂y, y_e⟩ · ∂ log π_e: over draws, an
    estimate of the gradient of the π-weighted mixture without running it, but with no comparison of experts
    within a step. reinforce: no gradient through the weights; the caller scores each sample by its loss
    (score-function estimator, Williams 1992) with `log_prob`.
    """
    log_pi = (logits / temperature).log_softmax(-1)
    hard = sample_one_hot(log_pi)
    if selection == "switch":
        pi = log_pi.exp()
        return hard * (pi / pi.detach()), None
    return hard.detach(), (hard.detach() * log_pi).sum((-1, -2))


def select_experts(logits: torch.Tensor, selection: str, temperature: float | torch.Tensor) -> torch.Tensor:
    """Training-time route weights from router logits (..., E).

    softmax: softmax(x/τ). gumbel: softmax((x+g)/τ). gumbel_st: one-hot argmax of the gumbel
    sample in the forward pass, its soft gradient in the backward pass.
    """
    if selection == "softmax":
        return (logits / temperature).softmax(-1)
    soft = ((logits + gumbel_noise(logits.shape, logits.device)) / temperature).softmax(-1)
    if selection == "gumbel":
        return soft
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard - soft.detach() + soft


class TaskTable(nn.Module):
    """The task representation table (num_tasks × task_dim): learned, or set from given vectors by its owner."""

    def __init__(self, num_tasks: int, task_dim: int, frozen: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(num_tasks, task_dim)
        setattr(self.embedding, TORCH_INIT, True)
        self.freeze(frozen)

    def freeze(self, frozen: bool = True) -> None:
        self.frozen = frozen
        self.embedding.weight.requires_grad_(not frozen)

    @property
    def num_tasks(self) -> int:
        return self.embedding.num_embeddings

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, task_dim)
        vectors = self.embedding(task_ids)
        # a frozen table passes no gradient even if a loader turned requires_grad back on
        return vectors.detach() if self.frozen else vectors


class MLPRouter(nn.Module):
    """One small MLP per routed layer: task_dim → hidden → GELU → E (the paper's default)."""

    def __init__(self, task_dim: int, hidden: int, num_layers: int, num_experts: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(task_dim, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
            for _ in range(num_layers)
        )

    def forward(self, tasks: torch.Tensor) -> torch.Tensor:  # (U, d) -> (U, L, E)
        return torch.stack([mlp(tasks) for mlp in self.layers], dim=1)


class RecurrentRouter(nn.Module):
    """An LSTM or GRU run over the layer sequence, so each layer's route can depend on the earlier ones."""

    def __init__(self, task_dim: int, hidden: int, num_layers: int, num_experts: int, cell: str):
        super().__init__()
        self.layer_embedding = nn.Embedding(num_layers, task_dim)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(task_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_experts)

    def forward(self, tasks: torch.Tensor) -> torch.Tensor:  # (U, d) -> (U, L, E)
        steps = tasks[:, None, :] + self.layer_embedding.weight[None]  # (U, L, d)
        return self.head(self.rnn(steps)[0])


class TransformerRouter(nn.Module):
    """A small transformer encoder over one token per routed layer, each seeded with the task representation."""

    def __init__(self, task_dim: int, hidden: int, num_layers: int, num_experts: int, depth: int = 2, heads: int = 4):
        super().__init__()
        self.project = nn.Linear(task_dim, hidden)
        self.layer_embedding = nn.Embedding(num_layers, hidden)
        block = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, num_experts)

    def forward(self, tasks: torch.Tensor) -> torch.Tensor:  # (U, d) -> (U, L, E)
        tokens = self.project(tasks)[:, None, :] + self.layer_embedding.weight[None]
        return self.head(self.encoder(tokens))


def build_router_network(options: MoEOptions, task_dim: int, num_layers: int) -> nn.Module:
    args = (task_dim, options.router_hidden, num_layers, options.num_experts)
    if options.router == "mlp":
        return MLPRouter(*args)
    if options.router in ("lstm", "gru"):
        return RecurrentRouter(*args, cell=options.router)
    return TransformerRouter(*args)


def fixed_route_table(options: MoEOptions, num_layers: int) -> torch.Tensor:
    """Route weights (num_tasks, L, E) of the fixed sources: average, random (seeded) and given.

    Built on the CPU even where the default device is "meta" (as in `from_pretrained`).
    """
    shape = (options.num_tasks, num_layers, options.num_experts)
    cpu = torch.device("cpu")
    if options.routes == "average":
        return torch.full(shape, 1.0 / options.num_experts, device=cpu)
    if options.routes == "random":
        generator = torch.Generator(device=cpu).manual_seed(options.route_seed)
        choice = torch.randint(options.num_experts, shape[:2], generator=generator, device=cpu)
        return F.one_hot(choice, options.num_experts).float()
    given = torch.as_tensor(options.given_routes, device=cpu)
    if tuple(given.shape) == shape[:2] and not given.is_floating_point():
        if given.min() < 0 or given.max() >= options.num_experts:
            raise UsageError(
                f"MoE option `given_routes` names experts {sorted(set(given.flatten().tolist()))}; "
                f"allowed: 0 to {options.num_experts - 1}"
            )
        return F.one_hot(given, options.num_experts).float()
    if tuple(given.shape) == shape:
        given = given.float()
        if given.min() < 0 or (given.sum(-1) <= 0).any():
            raise UsageError(
                "MoE option `given_routes`: route weights must be >= 0 with a positive sum for every task and layer"
            )
        return given
    raise UsageError(
        f"MoE option `given_routes` has shape {tuple(given.shape)}; expected expert indices of shape {shape[:2]} "
        f"(num_tasks, routed layers) or weights of shape {shape}"
    )


class TaskRouter(nn.Module):
    """Routes of every routed layer for each example's task: (B,) task ids → (B, L, E) weights.

    Learned routes are computed once per distinct task in the batch (one route per task, as in
    the paper; with homogeneous batches the gumbel sample is shared by the whole batch). The
    selection temperature is a buffer, so callbacks set it and checkpoints keep it.
    """

    def __init__(self, options: MoEOptions, task_dim: int, num_layers: int):
        super().__init__()
        self.selection = options.selection
        self.frozen = False
        self.top_k = options.top_k
        self.source = options.routes
        self.num_layers = num_layers
        self.num_experts = options.num_experts
        self.register_buffer("temperature", torch.tensor(float(options.temperature)))
        if self.source == "learned":
            self.network = build_router_network(options, task_dim, num_layers)
            for module in self.network.modules():
                if hasattr(module, "reset_parameters"):
                    setattr(module, TORCH_INIT, True)
            self.freeze(options.freeze_router)
        else:
            self.register_buffer("fixed_routes", fixed_route_table(options, num_layers))
        # per-task route overrides (`set_route_overrides`): buffers, so checkpoints and `save_pretrained` keep them;
        # on the CPU even under a "meta" default device (`from_pretrained` of a model saved without them)
        cpu = torch.device("cpu")
        self.register_buffer("override_mask", torch.zeros(options.num_tasks, dtype=torch.bool, device=cpu))
        routes = torch.zeros(options.num_tasks, num_layers, self.num_experts, device=cpu)
        self.register_buffer("override_routes", routes)

    @property
    def learned(self) -> bool:
        return self.source == "learned"

    def freeze(self, frozen: bool = True) -> None:
        """Fix the learned routes: no gradient, and evaluation routes as training does (see `forward`)."""
        self.frozen = frozen
        for param in self.network.parameters():
            param.requires_grad_(not frozen)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a checkpoint saved before route overrides existed loads with none set
        for name in ("override_mask", "override_routes"):
            state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name), device="cpu"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_route_overrides(self, task_ids, routes: torch.Tensor) -> None:
        """Route the tasks `task_ids` (n,) by the weights `routes` (n, L, E) in training and evaluation alike,
        with no gradient (fixed routes of unseen tasks, disabled experts). Weights are used as given (not
        renormalised); each must be >= 0 with a positive sum per task and layer."""
        task_ids = torch.as_tensor(task_ids, dtype=torch.long).flatten()
        routes = torch.as_tensor(routes, dtype=torch.float32)
        num_tasks = self.override_mask.shape[0]
        expected = (len(task_ids), self.num_layers, self.num_experts)
        if tuple(routes.shape) != expected:
            raise UsageError(
                f"route overrides have shape {tuple(routes.shape)}; expected (tasks, routed layers, experts) "
                f"= {expected}"
            )
        bad = [i for i in task_ids.tolist() if not 0 <= i < num_tasks]
        if bad:
            raise UsageError(f"route overrides name task ids {bad}; allowed: 0 to {num_tasks - 1}")
        if not torch.isfinite(routes).all() or routes.min() < 0 or (routes.sum(-1) <= 0).any():
            raise UsageError("route overrides must be finite, >= 0, with a positive sum for every task and layer")
        self.override_routes[task_ids.to(self.override_routes.device)] = routes.to(self.override_routes.device)
        self.override_mask[task_ids.to(self.override_mask.device)] = True

    @torch.no_grad()
    def clear_route_overrides(self, task_ids=None) -> None:
        """Route the tasks `task_ids` (all tasks if None) by their own source again."""
        ids = slice(None) if task_ids is None else torch.as_tensor(task_ids, dtype=torch.long).flatten()
        self.override_mask[ids] = False
        self.override_routes[ids] = 0.0

    def apply_overrides(self, task_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`weights` (B, L, E) of the tasks `task_ids` (B,), with the overridden tasks' routes put in (no sync)."""
        mask = self.override_mask[task_ids][:, None, None]
        return torch.where(mask, self.override_routes[task_ids].to(weights.dtype), weights)

    def set_temperature(self, value: float) -> None:
        if not value > 0:
            raise UsageError(f"temperature must be > 0, got {value}")
        self.temperature.fill_(value)

    def logits(self, task_representations: torch.Tensor) -> torch.Tensor:
        """Router logits (U, L, E) as fp32. Outside autocast (routing is precision-sensitive), in the
        network's own dtype: fp32 under mixed precision, bf16/fp16 only for a model cast as a whole."""
        dtype = next(self.network.parameters()).dtype
        with torch.autocast(device_type=task_representations.device.type, enabled=False):
            return self.network(task_representations.to(dtype)).float()

    @property
    def sparse(self) -> bool:
        """Training runs only the drawn expert of each route (selections "switch" and "reinforce")."""
        return self.selection in SPARSE_SELECTIONS

    def forward(self, task_ids: torch.Tensor, task_table: TaskTable) -> torch.Tensor:
        """Route weights (B, L, E), fp32 (`sample`'s weights)."""
        return self.sample(task_ids, task_table).weights

    def sample(self, task_ids: torch.Tensor, task_table: TaskTable) -> RouteSample:
        """Routes (B, L, E), fp32, with what training needs of them.

        Training uses `selection`. Evaluation scores routes still being learned by their hard top-k (the
        paper's inference); fixed routes (frozen router, fixed sources) route evaluation as training does,
        so what is scored and selected is the network that was trained. Tasks with a route override
        (`set_route_overrides`) route by it, in training and evaluation.
        Sparse selections run only the drawn expert: switch draws a route per task (like gumbel_st), reinforce
        one per example, so that the examples of a one-task batch compare routes within the step.
        """
        if not self.learned:
            weights = self.apply_overrides(task_ids, self.fixed_routes[task_ids].float())
            return RouteSample(weights, run_all=weights.requires_grad)
        tasks, inverse = torch.unique(task_ids, return_inverse=True)
        logits = self.logits(task_table(tasks))
        if self.sparse and self.training and not self.frozen:
            # switch draws one route per task, as gumbel_st does (a one-task batch runs one expert per layer);
            # reinforce one per example, so that its leave-one-out baseline compares routes within the batch
            # (docs/performance.md: per-example switch scored 0.20, per-task 0.25)
            per_example = self.selection == "reinforce"
            weights, log_prob = sparse_select(
                logits[inverse] if per_example else logits, self.selection, self.temperature.float()
            )
            if not per_example:
                weights = weights[inverse]
            if log_prob is not None:  # an overridden task's route was not sampled: it takes no part in the estimate
                log_prob = log_prob.masked_fill(self.override_mask[task_ids], 0.0)
            return RouteSample(self.apply_overrides(task_ids, weights), log_prob=log_prob)
        if self.selection != "argmax" and (self.training or self.frozen):
            weights = select_experts(logits, self.selection, self.temperature.float())
        else:  # argmax routes are fixed: no gradient, even through top-k's renormalised weights
            weights = hard_top_k(logits.detach() if self.selection == "argmax" else logits, self.top_k)
        weights = self.apply_overrides(task_ids, weights[inverse])
        return RouteSample(weights, run_all=weights.requires_grad)


@torch.no_grad()
def route_table(model) -> torch.Tensor:
    """The current routes (T, L, E) of a MoE-BART `model`, one distribution over experts per task and routed layer.

    Learned task routes: the selection probabilities: softmax(logits / τ) for softmax, switch and reinforce,
    softmax(logits) for gumbel selection (the Gumbel-max probability of each expert), one-hot argmax for argmax
    selection (stage two). Fixed routes: their table. Overridden tasks (`TaskRouter.set_route_overrides`): their
    override, normalised. Token routing has no route per task: uniform (the `RoutingMonitor` averages the gate
    weights of the training batches instead).
    """
    router = model.router
    num_tasks, num_layers = model.task_table.num_tasks, len(model.routed_layer_names)
    if router is None:
        num_experts = model.moe_options.num_experts
        return torch.full((num_tasks, num_layers, num_experts), 1.0 / num_experts)
    if not router.learned:
        table = router.fixed_routes.float() / router.fixed_routes.float().sum(-1, keepdim=True)
    else:
        task_ids = torch.arange(num_tasks, device=router.temperature.device)
        logits = router.logits(model.task_table(task_ids))
        if router.selection == "argmax":
            table = hard_top_k(logits, router.top_k)
        else:
            sampled_at_tau = router.selection in ("softmax", *SPARSE_SELECTIONS)  # π = softmax(logits / τ)
            temperature = router.temperature.float() if sampled_at_tau else 1.0
            table = (logits / temperature).softmax(-1)
    overrides = router.override_routes.float()  # tasks routed by `set_route_overrides`
    overrides = overrides / overrides.sum(-1, keepdim=True).clamp_min(torch.finfo(overrides.dtype).tiny)
    return torch.where(router.override_mask[:, None, None], overrides, table)
