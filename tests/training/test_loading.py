"""training/loading.py: a trained module from its checkpoint, with the checkpoint's own option values."""

import torch
from lightning.pytorch import Trainer

from moe_mtl.runs import checkpoint_fixed_routes
from moe_mtl.training import MoEMultiTaskModule, TwoStageTraining
from moe_mtl.training.loading import load_module

from .conftest import tiny_data, tiny_module, tiny_trainer


def test_a_checkpoint_of_flat_options_loads_with_its_own_values_not_the_defaults(tmp_path):
    """A checkpoint written before the option groups (`lr`, `num_beams`, … at the top level of its hyper-parameters)
    keeps its values through `load_module`; plain `load_from_checkpoint` would drop them for the defaults."""
    data = tiny_data(tmp_path / "data")
    data.prepare_data()
    module = tiny_module(data, optim={"lr": 3e-3, "warmup": 2}, evaluation={"num_beams": 2})
    trainer = Trainer(**tiny_trainer(tmp_path, max_steps=1))
    trainer.fit(module, datamodule=data)
    grouped = tmp_path / "grouped.ckpt"
    trainer.save_checkpoint(grouped)
    checkpoint = torch.load(grouped, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    for group in ("optim", "loss", "evaluation", "transfer"):  # the layout of an earlier moe-mtl
        hparams.update(hparams.pop(group))
    flat = tmp_path / "flat.ckpt"
    torch.save(checkpoint, flat)

    for path in (grouped, flat):
        loaded = load_module(path)
        assert (loaded.optim.lr, loaded.optim.warmup, loaded.evaluation.num_beams) == (3e-3, 2, 2)
        assert loaded.loss == module.loss and loaded.transfer == module.transfer
        saved, now = loaded.state_dict(), module.state_dict()
        assert saved.keys() == now.keys() and all(torch.equal(saved[key], now[key]) for key in saved)
    # what `load_module` mends: Lightning drops the flat keys the constructor does not name, for the defaults
    assert MoEMultiTaskModule.load_from_checkpoint(flat).evaluation.num_beams == 4


def test_a_stage_two_checkpoint_of_an_earlier_layout_loads_with_its_routes_fixed(tmp_path):
    """Before `TwoStageTraining` kept the stage, the module saved it apart ("moe_mtl": stage, stage_info) and the
    `moe` hyper-parameters kept stage one's selection: `load_module` still builds stage two."""
    data = tiny_data(tmp_path / "data")
    data.prepare_data()
    module = tiny_module(data)
    trainer = Trainer(**tiny_trainer(tmp_path, max_steps=2, callbacks=[TwoStageTraining(switch_step=1)]))
    trainer.fit(module, datamodule=data)
    path = tmp_path / "stage2.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint_fixed_routes(checkpoint) == "argmax"
    checkpoint["hyper_parameters"]["moe"].update(selection="gumbel_st", freeze_router=False, freeze_task_table=False)
    checkpoint["moe_mtl"].update(stage=2, stage_info={"routes": "argmax", "switch_step": 1})
    checkpoint["callbacks"]["TwoStageTraining"] = {"switched_at": 1}
    earlier = tmp_path / "earlier.ckpt"
    torch.save(checkpoint, earlier)

    assert checkpoint_fixed_routes(checkpoint) == "argmax"
    for loaded in (load_module(path), load_module(earlier)):
        router = loaded.model.router
        assert router.selection == "argmax" and not any(p.requires_grad for p in router.parameters())
        assert loaded.model.task_table.frozen
        assert torch.equal(loaded.route_table(), module.route_table())
