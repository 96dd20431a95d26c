"""GroupGradientClipping in real Lightning Trainer runs on the CPU.

Generic first: `NamedGroups`, a plain two-layer LightningModule (not moe_mtl's) whose optimizer groups are named
"body", "body.no_decay" and "head", in one process (fp32, bf16-mixed, 16-mixed), 2-process DDP and 2-process FSDP
(gloo). Then `MoEMultiTaskModule`, whose NaN check takes the clipped groups' norms from the callback.
"""

import math
import os
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from moe_mtl.training.callbacks import NanGuard
from moe_mtl.training.callbacks.clipping import (
    GroupGradientClipping,
    clip_to_max_norms,
    clipping_groups,
    gradients_are_sharded,
    group_grad_norms,
)

from ..conftest import MetricsLogger, PoisonGrad, tiny_module, tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ROWS = 8  # the global batch: every step trains on the same rows, each of 2 ranks on half of them
LIMITS = {"body": 1.0}  # the body's grad norm is 14 to 21 over the steps (> 3, asserted): clipped; the head is not
STEPS = 3


class NamedGroups(LightningModule):
    """y ≈ head(tanh(body(x))) on one fixed batch of `ROWS` rows, SGD over three named parameter groups: "body"
    (its weight), "body.no_decay" (its bias) and "head". Each rank trains on its share of the rows (rank, rank +
    world size, …), so any number of ranks steps on the gradient of the whole batch.

    fused: AdamW(fused=True) instead of SGD. fsdp: `configure_model` wraps body and head in FSDP units on the CPU.
    """

    def __init__(self, fused: bool = False, fsdp: bool = False):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.body, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
        with torch.no_grad():
            for param in self.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        self.x = torch.randn(ROWS, 4, generator=generator)
        self.y = 5 * torch.randn(ROWS, generator=generator)
        self.fused, self.fsdp = fused, fsdp

    def configure_model(self) -> None:
        if self.fsdp:  # Lightning's own wrapping passes no device_id, which FSDP needs on the CPU
            cpu = torch.device("cpu")
            self.body = FullyShardedDataParallel(self.body, device_id=cpu, use_orig_params=True)
            self.head = FullyShardedDataParallel(self.head, device_id=cpu, use_orig_params=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        share = slice(self.global_rank, None, self.trainer.world_size)
        return F.mse_loss(self.head(torch.tanh(self.body(x[share]))).squeeze(-1).float(), y[share])

    def configure_optimizers(self):
        names = defaultdict(list)
        for name, param in self.named_parameters():
            group = "head" if name.startswith("head") else "body.no_decay" if name.endswith("bias") else "body"
            names[group].append(param)
        groups = [{"params": params, "name": name} for name, params in names.items()]
        if self.fused:
            return torch.optim.AdamW(groups, lr=0.1, fused=True)
        return torch.optim.SGD(groups, lr=0.5)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.x, self.y), batch_size=ROWS)


def norms_by_hand(optimizer) -> dict[str, float]:
    """The L2 norm of each group's grads, "body" and "body.no_decay" together as the key "body" holds them."""
    grads = defaultdict(list)
    for group in optimizer.param_groups:
        grads[group.get("name", "-").split(".")[0]] += [p.grad.flatten() for p in group["params"] if p.grad is not None]
    return {key: torch.linalg.vector_norm(torch.cat(flat).double()).item() for key, flat in grads.items() if flat}


class GradNormProbe(Callback):
    """Each step's group norms (by hand) before clipping (listed before GroupGradientClipping, its hook runs first)
    and as the optimizer used them (the grads stay in place after the step until the next one zeroes them)."""

    def __init__(self):
        self.before: list[dict[str, float]] = []
        self.after: list[dict[str, float]] = []
        self.published: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before.append(norms_by_hand(optimizer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(norms_by_hand(trainer.optimizers[0]))
        published = getattr(pl_module, "pre_clip_grad_norms", {})  # before the clipping callback clears it
        self.published.append({key: norm.item() for key, norm in published.items()})


def fit(
    module: LightningModule, limits: dict[str, float], datamodule=None, callbacks=(), **options
) -> tuple[MetricsLogger, GradNormProbe]:
    """`module` trained `STEPS` steps with GroupGradientClipping(limits) after a probe and before `callbacks`, Trainer
    `options` over `tiny_trainer`'s; the logger (every step) and the probe."""
    logger, probe = MetricsLogger(), GradNormProbe()
    callbacks = [probe, GroupGradientClipping(limits), *callbacks]
    options = dict(max_steps=STEPS, logger=logger, log_every_n_steps=1, callbacks=callbacks, **options)
    L.Trainer(**tiny_trainer(**options)).fit(module, datamodule=datamodule)
    return logger, probe


# --- the groups and the pure functions -----------------------------------------------------------------


def test_a_key_holds_the_groups_named_so_or_under_it():
    params = {name: nn.Parameter(torch.zeros(1)) for name in ("body", "body.no_decay", "bodyguard", "head", "x")}
    param_groups = [{"params": [p], "name": name} for name, p in params.items() if name != "x"]
    param_groups.append({"params": [params["x"]]})  # an unnamed group: in no key
    groups = clipping_groups(param_groups, ["body", "head", "tail"])
    assert groups["body"] == [params["body"], params["body.no_decay"]]  # not "bodyguard"
    assert groups["head"] == [params["head"]] and groups["tail"] == []


def test_group_norms_and_clipping_are_those_of_clip_grad_norm_on_each_group():
    torch.manual_seed(0)
    groups = {key: [nn.Parameter(torch.randn(5, 3)) for _ in range(3)] for key in ("a", "b", "c")}
    twins = {key: [nn.Parameter(p.detach().clone()) for p in params] for key, params in groups.items()}
    for key in groups:
        for param, twin in zip(groups[key], twins[key], strict=True):
            param.grad = torch.randn_like(param)
            twin.grad = param.grad.clone()
    groups["c"][0].grad = twins["c"][0].grad = None  # a parameter without a grad is left out
    for param in groups["b"]:
        param.grad = None  # a group without grads has no norm
    max_norms = {"a": 0.5, "b": 1.0, "c": 1e3}
    norms = group_grad_norms(groups)
    assert set(norms) == {"a", "c"}
    clip_to_max_norms(groups, max_norms, norms)
    for key in ("a", "c"):
        expected = torch.nn.utils.clip_grad_norm_([p for p in twins[key] if p.grad is not None], max_norms[key])
        assert torch.equal(norms[key], expected)
        for param, twin in zip(groups[key], twins[key], strict=True):
            assert (param.grad is None and twin.grad is None) or torch.equal(param.grad, twin.grad)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in groups["a"]])).item()
    assert clipped == pytest.approx(0.5, rel=1e-5)  # max_norm / (norm + 1e-6) of the norm


def test_max_norms_must_be_positive_and_not_nested():
    with pytest.raises(ValueError, match=r"max_norms\['body'\] is 0; give a max norm > 0"):
        GroupGradientClipping({"body": 0})
    with pytest.raises(ValueError, match=r"max_norms has 'body' and 'body.no_decay', and 'body' holds 'body.no_decay'"):
        GroupGradientClipping({"body": 1.0, "body.no_decay": 2.0})
    GroupGradientClipping({"body": 1.0, "bodyguard": 2.0, "head.no_decay": 1.0})  # no group in two keys


class Unnamed(NamedGroups):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_names_no_group_has_are_said_with_the_groups_the_optimizer_has():
    # a config's `router` limit over a model whose routes are not learned (no router group): warned, not refused
    with pytest.warns(UserWarning, match=r"max_norms names \['encoder'\], .* not clipped; .* named \['body', 'body.no"):
        fit(NamedGroups(), {"body": 1.0, "encoder": 1.0})
    with pytest.raises(ValueError, match=r"groups have no 'name' \(set one per group in `configure_optimizers`\)"):
        fit(Unnamed(), {"body": 1.0})
    fit(Unnamed(), {})  # nothing to clip: nothing to name


def test_strategies_whose_gradients_the_callback_cannot_see_whole_are_refused():
    assert not gradients_are_sharded(SingleDeviceStrategy("cpu"))
    assert not gradients_are_sharded(DDPStrategy())  # all-reduced by `on_before_optimizer_step`
    assert gradients_are_sharded(FSDPStrategy())  # FULL_SHARD
    assert gradients_are_sharded(FSDPStrategy(sharding_strategy="SHARD_GRAD_OP"))
    assert not gradients_are_sharded(FSDPStrategy(sharding_strategy="NO_SHARD"))
    with pytest.raises(ValueError, match="supports one device, DDP and FSDP, not ModelParallelStrategy"):
        gradients_are_sharded(ModelParallelStrategy())


# --- one process: fp32, bf16-mixed, 16-mixed ---------------------------------------------------------------


def sixteen_mixed() -> MixedPrecision:
    """16-mixed on the CPU: `Trainer(precision="16-mixed")` turns into bf16-mixed there ("AMP with fp16 is not
    supported on CPU"), but Lightning runs the plugin as given. A GradScaler at 2**10: the grads are 1024x too
    large until unscaled, and the fp16 activations' grads do not overflow."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))


PRECISIONS = {"32-true": {}, "bf16-mixed": {"precision": "bf16-mixed"}, "16-mixed": {"plugins": [sixteen_mixed()]}}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_group_is_clipped_to_its_own_norm_which_is_logged_before_clipping(precision):
    logger, probe = fit(NamedGroups(), LIMITS, **PRECISIONS[precision])
    _, reference = fit(NamedGroups(), LIMITS)  # fp32

    logged = logger.metrics["grad_norm/body"]
    assert "grad_norm/head" not in logger.metrics  # not clipped, not logged
    assert logged == pytest.approx([before["body"] for before in probe.before], rel=1e-6)
    # the unscaled gradient: the fp32 run's, to autocast's precision (a scaled one would be 1024x larger)
    assert logged == pytest.approx([before["body"] for before in reference.before], rel=0.02)
    for before, after in zip(probe.before, probe.after, strict=True):
        assert before["body"] > 3 * LIMITS["body"]
        assert after["body"] == pytest.approx(LIMITS["body"], rel=1e-5)  # clipped to its limit
        assert after["head"] == before["head"] > 0  # not clipped: untouched
    assert probe.published == [{}] * STEPS  # NamedGroups declares no `pre_clip_grad_norms`: left alone


def test_the_trainers_gradient_clip_val_applies_after_the_groups():
    logger, probe = fit(NamedGroups(), {"head": 1e3}, gradient_clip_val=0.1)
    assert logger.metrics["grad_norm/head"] == pytest.approx([before["head"] for before in probe.before], rel=1e-6)
    for after in probe.after:
        assert math.hypot(*after.values()) == pytest.approx(0.1, rel=1e-5)


def test_a_fused_optimizer_under_16_mixed_is_refused():
    with pytest.raises(ValueError, match=r"AdamW unscales 16-mixed gradients inside its step, after this callback"):
        fit(NamedGroups(fused=True), LIMITS, plugins=[sixteen_mixed()])
    fit(NamedGroups(fused=True), LIMITS)  # fp32: nothing scaled


# --- two processes: DDP and FSDP (gloo) ------------------------------------------------------------------


class RankRecorder(Callback):
    """Writes this rank's logged metrics and final weights to `<out>/rank<r>.pt` at the end of training."""

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        weights = {name: param.detach().clone() for name, param in pl_module.named_parameters()}
        state = {"metrics": dict(trainer.logger.metrics), "weights": weights}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_under_ddp_every_rank_clips_with_the_norm_of_the_global_batch(tmp_path):
    single = NamedGroups()
    logger, probe = fit(single, LIMITS)  # one process, the whole batch
    fit(NamedGroups(), LIMITS, devices=2, strategy="ddp_fork", callbacks=[RankRecorder(str(tmp_path))])

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for rank in ranks:
        assert rank["metrics"]["grad_norm/body"] == pytest.approx(logger.metrics["grad_norm/body"], rel=1e-5)
        for name, weight in single.named_parameters():  # every step moved the weights as the one process did
            torch.testing.assert_close(rank["weights"][name], weight.detach(), rtol=1e-5, atol=1e-6)
    assert ranks[0]["metrics"]["grad_norm/body"] == ranks[1]["metrics"]["grad_norm/body"]
    assert all(before["body"] > 3 * LIMITS["body"] for before in probe.before)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, unchanged: Lightning refuses the class itself with a CPU accelerator ("The strategy
    `fsdp` requires a GPU accelerator"), and checks for exactly that class, so a subclass runs it on gloo."""


def fsdp_rank(rank: int, out: str, port: int) -> None:
    """One of 2 FSDP ranks, started by the test as a launcher such as torchrun would (Lightning's own launcher
    would run the pytest command again)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0")
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    fit(NamedGroups(fsdp=True), LIMITS, devices=2, strategy=CPUFSDPStrategy(), callbacks=[ShardRecorder(out)])


class ShardRecorder(Callback):
    """This rank's logged metrics and, per step, how many of each group's weights it holds, in `<out>/rank<r>.pt`."""

    def __init__(self, out: str):
        self.out, self.held = out, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        held = {
            group["name"]: sum(p.grad.numel() for p in group["params"] if p.grad is not None)
            for group in optimizer.param_groups
        }
        self.held.append(held)

    def on_train_end(self, trainer, pl_module):
        state = {"metrics": dict(trainer.logger.metrics), "held": self.held, "strategy": type(trainer.strategy)}
        torch.save(state, Path(self.out) / f"rank{trainer.global_rank}.pt")


def run_ranks(target, out: Path, timeout_s: float = 240) -> None:
    """`target(rank, out, port)` in 2 forked processes (they inherit the imports: seconds less than spawned ones);
    fails if one raises or they run past `timeout_s`."""
    context = mp.start_processes(
        target, (str(out), find_free_network_port()), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:  # a rank left waiting in a collective would hang the suite
                process.kill()
            pytest.fail(f"the 2 ranks still ran after {timeout_s} s")


@pytest.mark.distributed
def test_under_fsdp_each_group_norm_sums_the_shards_of_every_rank(tmp_path):
    logger, _ = fit(NamedGroups(), LIMITS)  # one process, whole gradients
    run_ranks(fsdp_rank, tmp_path)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert all(rank["strategy"] is CPUFSDPStrategy for rank in ranks)
    held = [rank["held"][0] for rank in ranks]
    assert 0 < held[0]["body"] < 32 and held[0]["body"] + held[1]["body"] == 32  # each rank a shard of the weight
    for rank in ranks:  # the norm of the whole gradient, and steps 2 and 3 find the weights the one process had
        assert rank["metrics"]["grad_norm/body"] == pytest.approx(logger.metrics["grad_norm/body"], rel=1e-5)
    assert ranks[0]["metrics"]["grad_norm/body"] == ranks[1]["metrics"]["grad_norm/body"]  # one all-reduce


# --- MoEMultiTaskModule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_moe_module_groups_are_clipped_and_its_nan_check_takes_their_norms(data, precision):
    module = tiny_module(data, optim={"lr": 1e-2})
    logger, probe = fit(module, {"backbone": 1e-6}, precision=precision, datamodule=data)

    # AdamW is fused on the CPU, but not under mixed precision (Lightning refuses `gradient_clip_val` with it there)
    assert module.trainer.optimizers[0].defaults["fused"] is (True if precision == "32-true" else None)
    logged = logger.metrics["grad_norm/backbone"]  # of "backbone" and "backbone.no_decay" together
    assert logged == pytest.approx([before["backbone"] for before in probe.before], rel=1e-5)
    assert [published["backbone"] for published in probe.published] == pytest.approx(logged, rel=1e-6)
    assert module.pre_clip_grad_norms == {}  # cleared at the end of each batch
    for before, after in zip(probe.before, probe.after, strict=True):
        assert before["backbone"] > 1e-3
        assert after["backbone"] == pytest.approx(1e-6, rel=1e-4)
        assert after["router"] == before["router"] > 0  # not clipped: untouched
        assert after["task_table"] == before["task_table"] > 0


def test_moe_nan_check_still_stops_on_non_finite_grads_of_a_clipped_group(data):
    # the poisoned grad is the shared embedding's, in the backbone: its norm comes from the clipping callback
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at step 1 .*finite loss"):
        fit(tiny_module(data), {"backbone": 1.0}, callbacks=[PoisonGrad(1), NanGuard("stop")], datamodule=data)
