"""torch.compile of MoE-BART, unit by unit: each BART layer (dense, or each whole-layer expert) and each
feed-forward expert with its layer's attention, compiled on its own with dynamic shapes.

The routing between the units stays eager: it reads the routes from the device and branches on them (which
experts run, on which rows, into which cache slot), which would break a whole-model graph at every routed layer.
Each unit is an ordinary transformers or moe_mtl module, so its graph is the one torch makes for it; the experts
of a layer share their code, and with dynamic sizes one graph serves every subset of rows and every padded
length, so that a new batch shape does not recompile.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .layers import FFNExpertDecoderLayer, FFNExpertEncoderLayer, LayerExperts


def compile_units(model: nn.Module) -> Iterator[nn.Module]:
    """The modules of an `MoEBartForConditionalGeneration` that `compile_layers` compiles, encoder then decoder."""
    for stack in (model.model.encoder, model.model.decoder):
        for layer in stack.layers:
            if isinstance(layer, LayerExperts):
                yield from layer.experts
            elif isinstance(layer, FFNExpertEncoderLayer | FFNExpertDecoderLayer):
                yield layer.self_attn  # the token gate and the bank's row gathers stay eager
                if isinstance(layer, FFNExpertDecoderLayer):
                    yield layer.encoder_attn
                yield from layer.experts
            else:
                yield layer


def compile_layers(model: nn.Module, **options) -> int:
    """Compile every unit of `model` in place (`nn.Module.compile`: parameter names and checkpoints stay as they
    are) with dynamic shapes; `options` go to `torch.compile`. Returns the number of units."""
    units = list(compile_units(model))
    for unit in units:
        unit.compile(**{"dynamic": True, **options})
    return len(units)
