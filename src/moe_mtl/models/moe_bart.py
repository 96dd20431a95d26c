"""MoEBartForConditionalGeneration: BART whose chosen layers are banks of experts chosen per task.

Built from transformers' own BART modules (embeddings, attention, layers, masks, cache). The
encoder owns the task table and the task router: it computes the routes of every routed layer
once per forward and hands the decoder's share on in its output, so that `generate` reuses the
same routes at every decoding step (and expands them with the beams).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import BartForConditionalGeneration, GenerationMixin, PreTrainedModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.bart.modeling_bart import (
    BartDecoderLayer,
    BartEncoderLayer,
    BartLearnedPositionalEmbedding,
    BartScaledWordEmbedding,
    shift_tokens_right,
)

from ..errors import UsageError
from .cache_contract import GENERATION_NAME, layer_cache, output_cache, take_cache
from .config import MoEBartConfig, MoEOptions
from .conversion import load_dense_state_dict
from .layers import FFNExpertDecoderLayer, FFNExpertEncoderLayer, LayerExperts, LayerRoute, RouteRecord
from .routed_cache import RoutedCache
from .routing import TORCH_INIT, RouteSample, TaskRouter, TaskTable
from .token_gate import TaskAwareTokenGate


@dataclass
class MoEEncoderOutput(BaseModelOutput):
    """Encoder states plus what the decoder needs to route the same way (batch-first, so beams expand them)."""

    decoder_routes: torch.Tensor | None = None  # (B, L_dec, E) task routes of the decoder's routed layers
    run_all: bool | None = None  # every expert runs on every example (the routes' gradient needs each one's output)
    route_log_prob: torch.Tensor | None = None  # (B,) selection "reinforce" in training: see `MoESeq2SeqLMOutput`
    task_representations: torch.Tensor | None = None  # (B, t) task representations (token routing)
    routes: dict[str, RouteRecord] | None = None


@dataclass
class MoESeq2SeqLMOutput(Seq2SeqLMOutput):
    """`Seq2SeqLMOutput` plus the routing of this forward pass.

    routes: per routed layer ("encoder.3", "decoder.0"), a `RouteRecord` (weights used, experts used).
    aux_loss: mean load-balancing loss over token-routed layers (None for task routing); not in `loss`.
    overflow_tokens: (token, expert) pairs dropped for capacity, summed over layers.
    route_log_prob: (B,) selection "reinforce" in training: log π of each example's sampled routes (summed over
        routed layers), for the caller's score-function term (`training.losses.reinforce_surrogate`).
    """

    routes: dict[str, RouteRecord] | None = None
    aux_loss: torch.Tensor | None = None
    overflow_tokens: torch.Tensor | None = None
    route_log_prob: torch.Tensor | None = None

    @property
    def expert_mask(self) -> dict[str, torch.Tensor]:
        """Per routed layer, which experts got non-zero weight: the others need no update this step."""
        return {name: record.used for name, record in (self.routes or {}).items()}


def check_task_ids(task_ids: torch.Tensor | None, batch_size: int, num_tasks: int, device) -> torch.Tensor:
    if task_ids is None:
        if num_tasks == 1:
            return torch.zeros(batch_size, dtype=torch.long, device=device)
        raise UsageError(f"`task_ids` is required: the model has num_tasks={num_tasks}; pass one id per example")
    if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int32, torch.int64):
        raise UsageError(f"`task_ids` must be a LongTensor of shape ({batch_size},), got {task_ids!r}")
    if task_ids.shape != (batch_size,):
        raise UsageError(f"`task_ids` has shape {tuple(task_ids.shape)}; expected ({batch_size},), one per example")
    if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
        raise UsageError(
            f"`task_ids` holds {sorted(set(task_ids.tolist()))}; allowed task ids: 0 to {num_tasks - 1} "
            f"(MoE option `num_tasks`={num_tasks})"
        )
    return task_ids.long()


def _longest_cache_slot(cache: Cache | None) -> int:
    """The self-attention cache slot that has seen the most tokens.

    Whole-layer decoder experts own one slot each and only used experts fill theirs, so slot 0
    may stay empty; the mask and positions are sized by the slot that holds the full history.
    """
    if cache is None or len(cache.layers) == 0:
        return 0
    lengths = [layer.get_seq_length() for layer in cache.layers]
    return max(range(len(lengths)), key=lengths.__getitem__)


def word_embedding(config: MoEBartConfig) -> BartScaledWordEmbedding:
    embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
    return BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale=embed_scale)


class MoEBartStack(nn.Module):
    """What BART's encoder and decoder share: token and position embeddings, their layer norm, and
    how a routed layer is handed its route."""

    def __init__(self, config: MoEBartConfig):
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.embed_tokens = word_embedding(config)
        self.embed_positions = BartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layernorm_embedding = nn.LayerNorm(config.d_model)

    def embed(self, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layernorm_embedding(inputs_embeds + positions.to(inputs_embeds.device))
        return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

    @staticmethod
    def layer_route(routes, k: int, task_representations, token_mask, run_all: bool, subset: bool = True) -> LayerRoute:
        """The route of the k-th routed layer of this stack; `routes` (B, L, E) are this stack's own."""
        return LayerRoute(
            weights=None if routes is None else routes[:, k],
            task_representations=task_representations,
            token_mask=token_mask,
            run_all=run_all,
            subset=subset,
        )


class MoEBartEncoder(MoEBartStack):
    """BART encoder with routed layers; owns the task table and the router of every routed layer."""

    def __init__(self, config: MoEBartConfig, options: MoEOptions):
        super().__init__(config)
        self.routed = options.routed_layers("encoder", config.encoder_layers)
        self.decoder_routed = options.routed_layers("decoder", config.decoder_layers)
        self.num_tasks = options.num_tasks
        task_dim = options.task_dim
        self.task_table = TaskTable(options.num_tasks, task_dim, frozen=options.freeze_task_table)
        self.router = None
        if options.routing == "task":
            self.router = TaskRouter(options, task_dim, len(self.routed) + len(self.decoder_routed))
        self.layers = nn.ModuleList(
            routed_layer(config, options, i, BartEncoderLayer, FFNExpertEncoderLayer, task_dim)
            if i in self.routed
            else BartEncoderLayer(config, layer_idx=i)
            for i in range(config.encoder_layers)
        )

    def route(self, task_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Task routes (B, L_enc + L_dec, E) for task routing, else task representations (B, t) for the token gates."""
        sample, task_representations = self.sample_routes(task_ids)
        return (None if sample is None else sample.weights), task_representations

    def sample_routes(self, task_ids: torch.Tensor) -> tuple[RouteSample | None, torch.Tensor | None]:
        """`route`, with the task router's whole `RouteSample`."""
        if self.router is not None:
            return self.router.sample(task_ids, self.task_table), None
        return None, self.task_table(task_ids)

    def check_given_routes(
        self, routes: torch.Tensor | None, task_representations: torch.Tensor | None, batch: int
    ) -> None:
        """Given routes must be what this model's routing takes, in its shape (see `forward`)."""
        if self.router is not None:
            given, name = routes, "routes"
            shape = (batch, len(self.routed) + len(self.decoder_routed), self.router.num_experts)
        else:
            given, name = task_representations, "task_representations"
            shape = (batch, self.task_table.embedding.embedding_dim)
        if given is None or (routes is not None and task_representations is not None):
            routing = "task" if self.router is not None else "token"
            raise UsageError(f"{routing} routing takes given `{name}` {shape} alone")
        if tuple(given.shape) != shape:
            raise UsageError(f"given `{name}` have shape {tuple(given.shape)}; expected {shape}")

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        task_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        routes: torch.Tensor | None = None,
        task_representations: torch.Tensor | None = None,
    ) -> MoEEncoderOutput:
        """Encode; routes come from `task_ids`, or are given: `routes` (B, L_enc + L_dec, E) for task routing,
        `task_representations` (B, t) for token routing, e.g. uniform routes for a task without a trained row."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("You must specify exactly one of input_ids or inputs_embeds")
        if output_attentions or output_hidden_states:
            raise NotImplementedError("MoE-BART does not record attentions or per-layer hidden states")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size = inputs_embeds.shape[0]
        if attention_mask is not None and attention_mask.shape != inputs_embeds.shape[:2]:
            raise UsageError(
                f"`attention_mask` has shape {tuple(attention_mask.shape)}; expected {tuple(inputs_embeds.shape[:2])}"
            )
        sample = None
        if routes is None and task_representations is None:
            task_ids = check_task_ids(task_ids, batch_size, self.num_tasks, inputs_embeds.device)
            sample, task_representations = self.sample_routes(task_ids)
        else:
            self.check_given_routes(routes, task_representations, batch_size)
        if sample is None:
            sample = None if routes is None else RouteSample(routes, run_all=routes.requires_grad)
        routes = None if sample is None else sample.weights
        run_all = sample is not None and sample.run_all

        hidden_states = self.embed(inputs_embeds, self.embed_positions(inputs_embeds[:, :, -1]))
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)

        encoder_routes = None if routes is None else routes[:, : len(self.routed)]
        records = {}
        for i, layer in enumerate(self.layers):
            if i not in self.routed:
                hidden_states = layer(hidden_states, mask)
                continue
            route = self.layer_route(
                encoder_routes, self.routed.index(i), task_representations, attention_mask, run_all
            )
            hidden_states, records[f"encoder.{i}"] = layer(hidden_states, mask, route=route)

        return MoEEncoderOutput(
            last_hidden_state=hidden_states,
            decoder_routes=None if routes is None else routes[:, len(self.routed) :],
            run_all=run_all,
            route_log_prob=None if sample is None else sample.log_prob,
            task_representations=task_representations,
            routes=records,
        )


class MoEBartDecoder(MoEBartStack):
    """BART decoder with routed layers. Whole-layer experts own separate key/value cache slots."""

    def __init__(self, config: MoEBartConfig, options: MoEOptions, task_dim: int):
        super().__init__(config)
        self.routed = options.routed_layers("decoder", config.decoder_layers)

        layers, slot = [], 0
        for i in range(config.decoder_layers):
            if i in self.routed:
                layers.append(routed_layer(config, options, slot, BartDecoderLayer, FFNExpertDecoderLayer, task_dim))
                slot += options.num_experts if options.expert_unit == "layer" else 1
            else:
                layers.append(BartDecoderLayer(config, layer_idx=slot))
                slot += 1
        self.layers = nn.ModuleList(layers)
        self.num_cache_slots = slot

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        encoder_hidden_states: torch.Tensor,
        routes: torch.Tensor | None,
        task_representations: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        run_all: bool = False,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None, dict[str, RouteRecord]]:
        if (input_ids is None) == (inputs_embeds is None):
            raise UsageError("You must specify exactly one of decoder_input_ids or decoder_inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = RoutedCache()
        batch_size, seq_length = inputs_embeds.shape[:2]
        self_attn_cache = cache.self_attention_cache if cache is not None else None
        slot = _longest_cache_slot(self_attn_cache)
        past_length = self_attn_cache.get_seq_length(slot) if self_attn_cache is not None else 0
        position_ids = torch.arange(seq_length, device=inputs_embeds.device) + past_length

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, past_length + seq_length, device=inputs_embeds.device)
        # the cache is passed by position: its keyword is `past_key_values` up to transformers 5.23, `cache` after
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, self_attn_cache, layer_idx=slot)
        encoder_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=encoder_attention_mask,
            encoder_hidden_states=encoder_hidden_states,
        )
        hidden_states = self.embed(
            inputs_embeds, self.embed_positions(input_ids, past_length, position_ids=position_ids)
        )

        # padding of the new tokens only: cached positions were routed when they were new
        token_mask = attention_mask[:, -seq_length:] if attention_mask.shape[1] >= seq_length else None
        records = {}
        cache_kwargs = {**layer_cache(cache), "use_cache": use_cache}
        for i, layer in enumerate(self.layers):
            if i not in self.routed:
                hidden_states = layer(hidden_states, mask, encoder_hidden_states, encoder_mask, **cache_kwargs)
                continue
            # an expert runs on its own rows only, unless its cache slot must hold the whole batch (a plain cache)
            subset = cache is None or isinstance(cache, RoutedCache)
            route = self.layer_route(routes, self.routed.index(i), task_representations, token_mask, run_all, subset)
            hidden_states, records[f"decoder.{i}"] = layer(
                hidden_states, mask, encoder_hidden_states, encoder_mask, route=route, **cache_kwargs
            )
        return hidden_states, cache, records


def routed_layer(config, options: MoEOptions, layer_idx: int, dense_cls, ffn_cls, task_dim: int) -> nn.Module:
    """The routed version of one BART layer: E whole layers, or one layer with E feed-forward experts."""
    if options.expert_unit == "layer":
        return LayerExperts([dense_cls(config, layer_idx=layer_idx + e) for e in range(options.num_experts)])
    gate = None
    if options.routing == "token":
        gate = TaskAwareTokenGate(config.d_model, task_dim, options.num_experts, options.top_k, options.capacity_factor)
    return ffn_cls(config, layer_idx, options.num_experts, gate)


class MoEBartModel(nn.Module):
    """Shared embeddings, the routed encoder (with task table and router) and the routed decoder."""

    def __init__(self, config: MoEBartConfig):
        super().__init__()
        options = config.moe_options
        self.shared = word_embedding(config)
        self.encoder = MoEBartEncoder(config, options)
        self.decoder = MoEBartDecoder(config, options, options.task_dim)


class MoEBartForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """BART encoder-decoder with task-routed (Ye et al. 2022) or task-aware token-routed (Gupta et al.
    2022) experts. Forward and `generate` take `task_ids` (B,) besides BART's arguments.

    Cost: with hard routes (evaluation top-k=1, fixed one-hot routes) each example runs one
    expert per routed layer: the FLOPs of dense BART of the same shape, in mixed-task batches and
    generation too (each whole-layer decoder expert's cache slot holds only its own rows: `RoutedCache`).
    Learned task routes in training by softmax, gumbel or gumbel_st, and "average" routes, run all E
    experts on the batch: E times the routed layers' cost, with one batched call per expert (no loop
    over examples); the sparse selections switch and reinforce run one sampled expert per example.
    Token routing runs top_k experts per token.
    """

    config_class = MoEBartConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _keys_to_ignore_on_load_unexpected = ["encoder.version", "decoder.version"]
    _tied_weights_keys = {
        "lm_head.weight": "model.shared.weight",
        "model.encoder.embed_tokens.weight": "model.shared.weight",
        "model.decoder.embed_tokens.weight": "model.shared.weight",
    }

    def __init__(self, config: MoEBartConfig, task_representations: torch.Tensor | None = None):
        super().__init__(config)
        for option in ("encoder_layerdrop", "decoder_layerdrop"):
            if getattr(config, option):
                # skipping layers at random would also make DDP ranks disagree on which experts ran
                raise UsageError(f"config `{option}` is {getattr(config, option)}; MoE-BART supports only 0.0")
        task_representations = self._take_task_representations(config, task_representations)
        self.model = MoEBartModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, config.vocab_size)))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()
        if task_representations is not None:  # after post_init, which would re-initialise the table
            with torch.no_grad():
                self.task_table.embedding.weight.copy_(task_representations)

    @staticmethod
    def _take_task_representations(
        config: MoEBartConfig, task_representations: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Given task representations (num_tasks, d), checked against `num_tasks`.

        The config then records their width and no file: the table itself is saved with the weights, so a
        checkpoint never needs the file again. The model reads no file: a config whose MoE option
        `task_embeddings` names one needs its tensor (`moe_mtl.representations.read_task_embeddings`).
        """
        options = config.moe_options
        if task_representations is None and options.task_embeddings is not None:
            raise UsageError(
                f"MoE option `task_embeddings` is {options.task_embeddings!r}, but the model reads no file: read it "
                "with moe_mtl.representations.read_task_embeddings and pass the tensor as `task_representations`"
            )
        if task_representations is None:
            return None
        if task_representations.dim() != 2 or task_representations.shape[0] != options.num_tasks:
            raise UsageError(
                f"task representations have shape {tuple(task_representations.shape)}; expected "
                f"(num_tasks={options.num_tasks}, dim)"
            )
        config.moe = {**config.moe, "task_dim": task_representations.shape[1], "task_embeddings": None}
        return task_representations.float()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> MoEBartForConditionalGeneration:
        model = super().from_pretrained(*args, **kwargs)
        # loading rebuilds every float parameter as trainable; a frozen table or router stays frozen
        model.task_table.freeze(model.moe_options.freeze_task_table)
        if model.router is not None and model.router.learned:
            model.router.freeze(model.moe_options.freeze_router)
        return model

    def _init_weights(self, module):
        if getattr(module, TORCH_INIT, False):
            # the task table and router: PyTorch's initialisation (rows N(0, 1)), not BART's std 0.02, with
            # which every task's router logits are ~1e-4 apart and routes stay uniform for hundreds of steps
            # (docs/routing_investigation.md). transformers' guarded init functions leave loaded weights alone.
            module.reset_parameters()
            return
        super()._init_weights(module)
        if isinstance(module, MoEBartForConditionalGeneration):
            nn.init.zeros_(module.final_logits_bias)
        if isinstance(module, TaskRouter):  # a model saved before route overrides existed: none set
            hf_init.zeros_(module.override_mask)
            hf_init.zeros_(module.override_routes)

    # --- public routing state (read and changed by callbacks) -------------------------------
    @property
    def moe_options(self) -> MoEOptions:
        return self.config.moe_options

    @property
    def task_table(self) -> TaskTable:
        return self.model.encoder.task_table

    @property
    def router(self) -> TaskRouter | None:
        return self.model.encoder.router

    @property
    def routed_layer_names(self) -> list[str]:
        encoder, decoder = self.model.encoder, self.model.decoder
        return [f"encoder.{i}" for i in encoder.routed] + [f"decoder.{i}" for i in decoder.routed]

    def set_temperature(self, value: float) -> None:
        """Selection temperature of the task router (no-op without a learned router)."""
        if self.router is not None and self.router.learned:
            self.router.set_temperature(value)

    def expert_parameters(self, layer_name: str, expert: int) -> list[nn.Parameter]:
        """The parameters of one expert of a routed layer ("encoder.3", "decoder.0")."""
        side, index = layer_name.split(".")
        layer = getattr(self.model, side).layers[int(index)]
        return list(layer.experts[expert].parameters())

    def get_input_embeddings(self):
        return self.model.shared

    def set_input_embeddings(self, value):
        self.model.shared = value
        self.model.encoder.embed_tokens = value
        self.model.decoder.embed_tokens = value

    def get_encoder(self):
        return self.model.encoder

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        dense: BartForConditionalGeneration | str | Path,
        task_representations: torch.Tensor | None = None,
        **moe_options,
    ) -> MoEBartForConditionalGeneration:
        """Upcycle a dense BART: every expert starts as a copy of the dense weights at its position.

        `dense` is a `BartForConditionalGeneration` or anything its `from_pretrained` accepts
        ("facebook/bart-base", a local directory). All non-expert weights are copied exactly;
        the task table, router and gates are new (the weight map: `conversion.load_dense_state_dict`).
        `task_representations` (num_tasks, d): task representations as the table's initial rows.
        """
        if not isinstance(dense, BartForConditionalGeneration):
            dense = BartForConditionalGeneration.from_pretrained(dense)
        options = MoEOptions.from_dict(moe_options)
        config = MoEBartConfig.from_bart_config(dense.config, options)
        config._attn_implementation = dense.config._attn_implementation
        model = cls(config, task_representations=task_representations)
        load_dense_state_dict(model, dense.state_dict())
        model.generation_config = copy.deepcopy(dense.generation_config)  # beams, n-gram blocking, lengths
        return model.to(device=dense.device, dtype=dense.dtype)

    def load_dense_state_dict(self, dense_state: dict[str, torch.Tensor]) -> None:
        """Copy a dense BART state dict in (`conversion.load_dense_state_dict`, the upcycling weight map)."""
        load_dense_state_dict(self, dense_state)

    # --- forward ----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: MoEEncoderOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        task_ids: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MoESeq2SeqLMOutput:
        """BART's forward with `task_ids` (B,); returns `MoESeq2SeqLMOutput` with the routes used.

        The transformers 5 model contract: the key/value cache comes as `cache` (or `past_key_values`, the name
        of transformers <= 5.23) and goes back in the output field that the installed release's `generate`
        reads; further keyword arguments are transformers' model-agnostic ones (`TransformersKwargs`), of
        which MoE-BART takes none: any that is set is an error, not ignored.
        """
        cache = take_cache(cache, kwargs)
        unsupported = sorted(key for key, value in kwargs.items() if value is not None and value is not False)
        if unsupported:
            raise UsageError(f"MoE-BART's forward does not take {unsupported}")
        if labels is not None:
            use_cache = False
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = shift_tokens_right(
                    labels, self.config.pad_token_id, self.config.decoder_start_token_id
                )
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise UsageError("pass `decoder_input_ids`, `labels` or `input_ids`")
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.model.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                task_ids=task_ids,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, MoEEncoderOutput):
            # plain encoder states: route from task_ids
            states = encoder_outputs[0]
            ids = check_task_ids(task_ids, states.shape[0], self.model.encoder.num_tasks, states.device)
            sample, task_representations = self.model.encoder.sample_routes(ids)
            routes = None if sample is None else sample.weights[:, len(self.model.encoder.routed) :]
            encoder_outputs = MoEEncoderOutput(
                last_hidden_state=states,
                decoder_routes=routes,
                run_all=sample is not None and sample.run_all,
                route_log_prob=None if sample is None else sample.log_prob,
                task_representations=task_representations,
                routes={},
            )

        hidden_states, cache, decoder_records = self.model.decoder(
            decoder_input_ids,
            encoder_outputs.last_hidden_state,
            encoder_outputs.decoder_routes,
            encoder_outputs.task_representations,
            attention_mask=decoder_attention_mask,
            run_all=bool(encoder_outputs.run_all),
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            # no cache unless asked for (generate asks): a filled cache makes decoder layer experts run
            # on the whole batch
            use_cache=bool(use_cache if use_cache is not None else cache is not None),
        )
        logits = self.lm_head(hidden_states) + self.final_logits_bias.to(hidden_states.device)

        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.to(logits.device).view(-1))
        routes = {**(encoder_outputs.routes or {}), **decoder_records}
        aux = [r.aux_loss for r in routes.values() if r.aux_loss is not None]
        overflow = [r.overflow for r in routes.values() if r.overflow is not None]
        return MoESeq2SeqLMOutput(
            loss=loss,
            logits=logits,
            **output_cache(cache),
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            routes=routes,
            aux_loss=torch.stack(aux).mean() if aux else None,
            overflow_tokens=torch.stack(overflow).sum() if overflow else None,
            route_log_prob=encoder_outputs.route_log_prob,
        )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, task_ids: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate` with `task_ids` (B,): every decoding step uses the routes the
        encoder pass computed, beams included. The default cache (`RoutedCache`) has one slot per whole-layer
        expert, holding only the rows that route to it; a plain `EncoderDecoderCache` passed in makes each used
        decoder expert run on the whole batch (its slots hold every row)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        slots = self.model.decoder.num_cache_slots
        if implementation not in (None, "dynamic") and slots != self.config.decoder_layers:
            raise UsageError(
                f"cache_implementation={implementation!r} sizes the cache by decoder layers "
                f"({self.config.decoder_layers}), "
                f"but whole-layer experts need {slots} slots; allowed: 'dynamic' (the default)"
            )
        if (
            kwargs.get(GENERATION_NAME) is None
            and kwargs.get("use_cache", True)
            and implementation in (None, "dynamic")
        ):
            kwargs[GENERATION_NAME] = RoutedCache()
            kwargs.pop("cache_implementation", None)
        return super().generate(inputs, task_ids=task_ids, **kwargs)
