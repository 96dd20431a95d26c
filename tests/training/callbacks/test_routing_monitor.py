"""RoutingMonitor in real Lightning Trainer runs on the CPU."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe_mtl.analysis.plots import route_heatmap_figure
from moe_mtl.training import RoutingMonitor

from ..conftest import tiny_module
from .conftest import fit

# --- RoutingMonitor ---------------------------------------------------------------------------------------


def _events(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_routing_monitor_logs_entropies_utilisation_and_route_maps_and_saves_route_tables(data, tmp_path):
    module = tiny_module(data)
    logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(logger=logger, max_steps=4, val_check_interval=2, limit_val_batches=1)
    fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=2, heatmap_every_n_steps=2)], **options)

    layers = module.model.routed_layer_names
    events = _events(logger.log_dir)
    scalars = set(events.Tags()["scalars"])
    expected = {"routing/entropy_per_task/mean", "routing/entropy_task_avg/mean"}
    for layer in layers:
        expected |= {f"routing/entropy_per_task/{layer}", f"routing/entropy_task_avg/{layer}"}
        expected |= {f"routing/utilisation/{layer}/expert{e}" for e in range(2)}
    assert expected <= scalars
    assert [e.step for e in events.Scalars("routing/entropy_per_task/encoder.0")] == [2, 4]
    assert [e.step for e in events.Images("routing/route_map")] == [2, 4]
    # with matplotlib (the `analysis` extra, in dev): the labelled figure of moe_mtl.analysis.plots, at its size
    image = events.Images("routing/route_map")[-1]
    figure = route_heatmap_figure(module.route_table(), data.task_names, layers, data.task_partitions)
    width, height = figure.get_size_inches() * figure.dpi
    assert (image.height, image.width) == (round(height), round(width))

    # the last logged values are those of the final route table, over the seen (training) tasks
    seen = module.route_table()[module.seen_tasks]  # (T_seen, L, E) learned softmax probabilities
    for j, layer in enumerate(layers):
        per_task = -(seen[:, j] * seen[:, j].log()).sum(-1).mean()
        share = seen[:, j].mean(0)
        averaged = -(share * share.log()).sum()
        assert events.Scalars(f"routing/entropy_per_task/{layer}")[-1].value == pytest.approx(per_task.item(), 1e-5)
        assert events.Scalars(f"routing/entropy_task_avg/{layer}")[-1].value == pytest.approx(averaged.item(), 1e-5)
        for e in range(2):
            value = events.Scalars(f"routing/utilisation/{layer}/expert{e}")[-1].value
            assert value == pytest.approx(share[e].item(), 1e-5)

    folder = Path(logger.log_dir) / "routes"
    assert sorted(p.name for p in folder.iterdir()) == ["step2.json", "step4.json"]
    record = json.loads((folder / "step4.json").read_text())
    assert (record["step"], record["tasks"], record["layers"], record["num_experts"]) == (4, data.task_names, layers, 2)
    routes = torch.tensor(record["routes"])
    assert routes.shape == (data.num_tasks, len(layers), 2)
    torch.testing.assert_close(routes, module.route_table(), atol=1e-6, rtol=0)


def test_uniform_routes_have_entropy_log_e_and_equal_utilisation(data, tmp_path):
    module = tiny_module(data, moe={"routes": "average"})
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=1, heatmap=False)], logger=logger, max_steps=2)
    events = _events(logger.log_dir)
    assert "routing/route_map" not in events.Tags()["images"]
    for layer in [*module.model.routed_layer_names, "mean"]:
        for kind in ("entropy_per_task", "entropy_task_avg"):
            values = [e.value for e in events.Scalars(f"routing/{kind}/{layer}")]
            assert values == pytest.approx([math.log(2)] * 2, rel=1e-6)
    shares = [e.value for e in events.Scalars("routing/utilisation/decoder.1/expert1")]
    assert shares == pytest.approx([0.5, 0.5], rel=1e-6)


def test_token_routes_saved_at_a_logged_step_are_the_logged_ones(data, tmp_path):
    # token routing's route table averages the gate weights since it was last read; a validation at a step the
    # monitor has just logged must not save the empty (uniform) table of a second read
    module = tiny_module(data, moe={"routing": "token", "expert_unit": "ffn"})
    logger = TensorBoardLogger(tmp_path, name="tb")
    options = dict(logger=logger, max_steps=2, val_check_interval=2, limit_val_batches=1)
    recorder = fit(module, data, tmp_path, [RoutingMonitor(every_n_steps=2, heatmap=False)], **options)
    routes = torch.tensor(json.loads((Path(logger.log_dir) / "routes" / "step2.json").read_text())["routes"])
    trained = sorted({task for s in recorder.steps for task in s.tasks})
    assert (routes != 0.5).any(-1).any(-1).nonzero().flatten().tolist() == trained  # the others: uniform
    events = _events(logger.log_dir)
    share = routes[module.seen_tasks].mean(0)  # (L, E)
    for j, layer in enumerate(module.model.routed_layer_names):
        logged = [events.Scalars(f"routing/utilisation/{layer}/expert{e}")[-1].value for e in range(2)]
        assert logged == pytest.approx(share[j].tolist(), abs=1e-5)


def test_routing_monitor_constructor_errors_name_the_option():
    with pytest.raises(ValueError, match="RoutingMonitor: `every_n_steps` is 0; it must be >= 1"):
        RoutingMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="`heatmap_every_n_steps` is 75; it must be a positive multiple of"):
        RoutingMonitor(every_n_steps=50, heatmap_every_n_steps=75)
