"""MoE-BART under real DDP (2 gloo processes) and under bf16 autocast on the CPU."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from .conftest import tiny_moe


def _train_one_step(rank: int, world_size: int, init_file: str, out_dir: str, options: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial weights on every rank
    # hard fixed routes leave unrouted experts without a gradient: DDP must be told so
    unused = options.get("routes") == "given"
    model = DistributedDataParallel(
        tiny_moe(num_experts=3, num_tasks=4, **options).train(), find_unused_parameters=unused
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # different examples (and gumbel draws) per rank
    ids = torch.randint(3, 64, (2, 6))
    out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([1, 1]))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters() if p.grad is not None}
    optimizer.step()
    torch.save({"grads": grads, "params": model.module.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ddp(tmp_path, options: dict) -> tuple[dict, dict]:
    # forked, not spawned: the ranks inherit the imported torch and transformers (seconds per test)
    mp.start_processes(_train_one_step, (2, str(tmp_path / "init"), str(tmp_path), options), 2, start_method="fork")
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["grads"].keys() == rank1["grads"].keys()
    for name, grad in rank0["grads"].items():
        torch.testing.assert_close(grad, rank1["grads"][name], msg=name)
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    return rank0, rank1


@pytest.mark.distributed
def test_ddp_averages_expert_router_and_task_table_gradients(tmp_path):
    rank0, _ = run_ddp(tmp_path, {})
    for name in ("model.encoder.task_table.embedding.weight", "model.encoder.router.network.layers.0.0.weight"):
        assert name in rank0["grads"] and rank0["grads"][name].abs().sum() > 0


@pytest.mark.distributed
def test_ddp_with_hard_fixed_routes_gives_unrouted_experts_no_gradient(tmp_path):
    # task 1 routes every layer to expert 2: experts 0 and 1 never run, and DDP leaves their grad None
    rank0, _ = run_ddp(tmp_path, {"routes": "given", "given_routes": [[0] * 4, [2] * 4, [0] * 4, [0] * 4]})
    assert any(".experts.2." in name for name in rank0["grads"])
    assert not any(".experts.0." in name or ".experts.1." in name for name in rank0["grads"])


def test_bf16_autocast_keeps_routing_in_fp32():
    model = tiny_moe(num_experts=3, num_tasks=4).train()
    ids = torch.randint(3, 64, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 3]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(record.weights.dtype == torch.float32 for record in out.routes.values())
    assert model.model.encoder.router.network.layers[0][0].weight.grad is not None


def test_bf16_autocast_token_routing_stays_finite():
    model = tiny_moe(num_experts=3, num_tasks=4, routing="token", expert_unit="ffn", capacity_factor=1.0).train()
    ids = torch.randint(3, 64, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 3]))
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    assert out.overflow_tokens is not None
