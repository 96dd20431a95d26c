"""Computing task representations (Ye et al. 2022): text and Fisher representations of tasks.

- text: the mean, over a task's training inputs, of the mean-pooled last encoder states (padding left out), from
  the model's own encoder or any local Hugging Face folder: an encoder-decoder's encoder, or an encoder-only model
  such as the sentence encoder all-MiniLM-L6-v2 (`representations.pretrained`), whose sentence embeddings are
  pooled as its sentence-transformers files say (the mean over tokens, then L2 normalisation).
- fisher: the diagonal Fisher information of the model's layer weights on a task's training examples (squared
  gradients of each target's log-likelihood, averaged over examples), reduced by a seeded count sketch.
Files of precomputed representations are `representations.files`.

An MoE-BART encodes with uniform ("average") routing over the experts of every routed layer, so a task's
representation does not depend on any task's route, and an unseen task, which has none, gets one the same way.
Reductions to `dim` are fixed projections (the same for every task and call), so seen and unseen tasks computed
at different times share one space. Results are cached in `<cache_dir>/<fingerprint>.pt`, like tokenised data
(`representations.cache`).

Where the paper's code (INK-USC/CrossTaskMoE, task_emb/) differs: its text embedding averages BartModel's last
states (those of the decoder, fed the shifted input) over padded positions; ours pools the encoder, padding left
out, as the paper describes it. Its Fisher embedding first trains adapters on each task and takes their weights'
Fisher; ours takes the Fisher of the given model's own layer weights, with no training, so any checkpoint (and
any unseen task) gets one at the cost of one backward pass per example.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.models.bart.modeling_bart import shift_tokens_right

from ..data import Task
from ..data.tasks import ALL_SEEDS, Example
from ..errors import UsageError
from ..models import MoEBartConfig, MoEBartForConditionalGeneration
from ..models.conversion import ROUTING_PARAMETERS
from .cache import Model, folder_fingerprint, model_fingerprint, representation_fingerprint
from .files import load_representations, save_representations
from .pretrained import SentencePooling, sentence_pooling

log = logging.getLogger(__name__)

REPRESENTATION_KINDS = ("text", "fisher")
PROJECTION_SEED = 0  # of the fixed projections to `dim`; part of every fingerprint


# --- the examples a representation is computed from -------------------------------------------------


def training_examples(task: Task, max_examples: int, fewshot_seed: int | str | None = None) -> list[Example]:
    """At most `max_examples` of the task's training examples, evenly spaced over the split (deterministic).

    The training split is `task.examples("train", fewshot_seed)`; a task with no training split of its own
    (a held-out task with k-shot splits only) uses the k-shot training examples of all its seeds.
    """
    if fewshot_seed is None and not task.splits.get("train"):
        fewshot_seed = ALL_SEEDS
    examples = task.examples("train", fewshot_seed)
    if len(examples) <= max_examples:
        return list(examples)
    # evenly spaced rather than the first ones: files are often sorted by label or length
    return [examples[i] for i in np.linspace(0, len(examples) - 1, max_examples).round().astype(int)]


# --- routing and encoding -------------------------------------------------------------------------------


def uniform_routing(model: MoEBartForConditionalGeneration, batch_size: int) -> dict[str, torch.Tensor]:
    """Encoder keywords that route every example the same way, independent of any task's route.

    Task routing: weight 1/E on every expert of every routed layer (the paper's "average" routing). Token
    routing: the mean row of the task table as every example's task representation, the gates' input for no task
    in particular.
    """
    encoder = model.model.encoder
    device = model.task_table.embedding.weight.device
    if model.router is not None:
        layers, experts = len(encoder.routed) + len(encoder.decoder_routed), model.router.num_experts
        return {"routes": torch.full((batch_size, layers, experts), 1.0 / experts, device=device)}
    mean = model.task_table.embedding.weight.detach().float().mean(0)
    return {"task_representations": mean.expand(batch_size, -1)}


def encoder_states(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last encoder states (B, L, d): a MoE-BART's under uniform routing; an encoder-decoder's encoder; else the
    model itself (an encoder-only model, e.g. a BertModel)."""
    if isinstance(model, MoEBartForConditionalGeneration):
        routing = uniform_routing(model, len(input_ids))
        return model.model.encoder(input_ids=input_ids, attention_mask=attention_mask, **routing).last_hidden_state
    # not `get_encoder` of every model: a BertModel's is its layer stack, which takes embeddings, not token ids
    encoder = model.get_encoder() if model.config.is_encoder_decoder else model
    return encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mean_pooled(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding positions: (B, L, d), (B, L) → (B, d). Padding left out, so an example's
    vector does not depend on the batch it was encoded in."""
    mask = attention_mask.to(states.dtype)[..., None]
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def target_log_likelihood(model: Model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(labels | input) summed over the target tokens of the batch (a MoE-BART under uniform routing)."""
    labels = batch["labels"]
    config = model.config
    decoder_input_ids = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if isinstance(model, MoEBartForConditionalGeneration):
        routing = uniform_routing(model, len(labels))
        inputs = {
            "encoder_outputs": model.model.encoder(**inputs, **routing),
            "attention_mask": batch["attention_mask"],
        }
    logits = model(**inputs, decoder_input_ids=decoder_input_ids).logits
    return -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


def fisher_parameters(model: Model) -> list[tuple[str, nn.Parameter]]:
    """The parameters the Fisher embedding is taken over: the weight matrices of the encoder and decoder layers
    (every expert's), as the paper takes its adapters' weight matrices; not embeddings, routers or gates."""
    return [
        (name, param)
        for name, param in model.named_parameters()
        if ".layers." in name and name.endswith(".weight") and param.dim() == 2 and not ROUTING_PARAMETERS.search(name)
    ]


# --- reductions to `dim` --------------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    """A generator seed from a hash of `parts` (Python's own `hash` of a string changes between processes)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def random_projection(native: int, dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """A fixed Gaussian projection (native, dim), scaled by 1/sqrt(dim) so that lengths are kept in expectation.

    Fixed by (`seed`, `native`, `dim`) rather than fitted to the tasks at hand (as PCA would be), so that
    vectors computed at different times, e.g. for unseen tasks after training, are in the same space.
    """
    generator = torch.Generator().manual_seed(_seed("projection", seed, native, dim))
    return torch.randn(native, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)


def count_sketch(pieces: Mapping[str, torch.Tensor], dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """A long vector, given as named pieces, reduced to (dim,): every coordinate is added with a random sign to
    one random bucket (a count sketch, Charikar et al. 2002), which keeps inner products in expectation.

    Buckets and signs are drawn per piece from a generator seeded by `seed` and the piece's name: the same
    coordinate lands in the same bucket in every call, and no (native × dim) matrix is ever held.
    """
    sketch = torch.zeros(dim, dtype=torch.float64)
    for name, values in pieces.items():
        flat = values.detach().reshape(-1).to("cpu", torch.float64)
        generator = torch.Generator().manual_seed(_seed("sketch", seed, name))
        buckets = torch.randint(dim, flat.shape, generator=generator)
        signs = torch.randint(2, flat.shape, generator=generator, dtype=torch.float64) * 2 - 1
        sketch.index_add_(0, buckets, flat * signs)
    return sketch


# --- the two kinds ---------------------------------------------------------------------------------------


def _batches(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int,
    lengths: tuple[int, int],
    device: torch.device,
    targets: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches of inputs (and first targets, labels padded with -100)."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer(
            [e.input for e in chunk], truncation=True, max_length=lengths[0], padding=True, return_tensors="pt"
        )
        batch = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if targets:
            labels = tokenizer(
                [e.targets[0] for e in chunk], truncation=True, max_length=lengths[1], padding=True, return_tensors="pt"
            )
            batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        yield {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def text_vector(
    model: Model,
    tokenizer,
    examples: Sequence[Example],
    batch_size: int,
    lengths: tuple[int, int],
    normalize: bool = False,
) -> torch.Tensor:
    """(d,): the mean over `examples` of their sentence embeddings: mean-pooled last encoder states, L2-normalised
    if `normalize` (a sentence encoder's own embedding, as its model card computes it)."""
    device = next(model.parameters()).device
    pooled = []
    for batch in _batches(tokenizer, examples, batch_size, lengths, device):
        mask = batch["attention_mask"]
        sentences = mean_pooled(encoder_states(model, batch["input_ids"], mask), mask)
        pooled.append(F.normalize(sentences.float(), dim=-1) if normalize else sentences)
    return torch.cat(pooled).double().mean(0).cpu()


def diagonal_fisher(
    model: Model, tokenizer, examples: Sequence[Example], lengths: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Per parameter of `fisher_parameters`, the mean over `examples` of the squared gradient of the example's
    target log-likelihood (the empirical diagonal Fisher). One example per backward pass: the Fisher needs each
    example's own gradient, not that of a batch mean."""
    device = next(model.parameters()).device
    named = fisher_parameters(model)
    if not named:
        raise UsageError(
            f"{type(model).__name__} has no weight matrices in `.layers.` to take a Fisher embedding over; "
            "Fisher embeddings need a BART-style encoder-decoder"
        )
    params = [param for _, param in named]
    fisher = [torch.zeros_like(param, dtype=torch.float32) for param in params]
    with _gradients_on(params):
        for batch in _batches(tokenizer, examples, 1, lengths, device, targets=True):
            grads = torch.autograd.grad(target_log_likelihood(model, batch), params, allow_unused=True)
            for total, grad in zip(fisher, grads, strict=True):
                if grad is not None:
                    total += grad.float() ** 2
    return {name: total / len(examples) for (name, _), total in zip(named, fisher, strict=True)}


@contextmanager
def _gradients_on(params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Let gradients reach `params` (a frozen table or expert included) for the duration; restore afterwards."""
    before = [param.requires_grad for param in params]
    try:
        for param in params:
            param.requires_grad_(True)
        yield
    finally:
        for param, flag in zip(params, before, strict=True):
            param.requires_grad_(flag)


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    """No dropout while representations are computed; the model's mode is restored afterwards."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


# --- the public entry points -----------------------------------------------------------------------------


def read_model_folder(path: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The configuration and tokenizer of a local Hugging Face model folder (the weights are loaded later, and
    only when the cache does not already hold the result)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"`encoder` {str(path)!r}: no such folder; give a local model folder")
    if not (path / "config.json").is_file():
        raise UsageError(
            f"`encoder` {str(path)!r} is not a model folder (no config.json); give a local folder "
            "written by `save_pretrained`"
        )
    try:
        return AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"`encoder` {str(path)!r} could not be loaded: {err}") from err


def load_folder_model(path: str | Path, config: PretrainedConfig, kind: str) -> Model:
    """The model of a folder: a saved MoE-BART, else `AutoModel` for "text" (any encoder, or the encoder of an
    encoder-decoder) and `AutoModelForSeq2SeqLM` for "fisher"; on the GPU if there is one."""
    if kind == "fisher" and not config.is_encoder_decoder:
        raise UsageError(
            f"`encoder` {str(path)!r} is an encoder-only {config.model_type} model: fisher representations take "
            "gradients of a target's likelihood and need an encoder-decoder (e.g. a BART folder); use kind text"
        )
    try:
        if config.model_type == MoEBartConfig.model_type:
            model = MoEBartForConditionalGeneration.from_pretrained(path)
        else:
            model = (AutoModel if kind == "text" else AutoModelForSeq2SeqLM).from_pretrained(path)
    except (OSError, ValueError) as err:  # e.g. no weights file
        raise UsageError(f"`encoder` {str(path)!r}: its model could not be loaded ({err})") from None
    return model.to("cuda") if torch.cuda.is_available() else model


def compute_representations(
    kind: str,
    tasks: Sequence[Task],
    *,
    model: Model | None = None,
    encoder: str | Path | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dim: int | None = None,
    max_examples: int = 64,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    max_input_length: int | None = None,
    max_target_length: int | None = None,
    fewshot_seed: int | str | None = None,
) -> torch.Tensor:
    """Representations (len(tasks), dim) float32 of `tasks`, rows in their order, from their training examples.

    kind: "text" or "fisher" (see the module docstring).
    model: a model in memory (a `MoEBartForConditionalGeneration`, or any Hugging Face encoder or
        encoder-decoder), with `tokenizer` the tokenizer of its training run.
    encoder: instead of `model`, a local model folder with its tokenizer (see `load_folder_model`); a
        sentence-transformers folder's text is pooled as it declares (`pretrained.sentence_pooling`).
    dim: the width wanted; None keeps the native one (d_model for "text", every weight of
        `fisher_parameters` for "fisher"). Text is reduced by `random_projection`, Fisher by `count_sketch`.
    max_examples: training examples per task (evenly spaced, see `training_examples`).
    batch_size: examples per encoder pass ("text"; "fisher" takes one example per backward pass).
    cache_dir: where results are cached as `<fingerprint>.pt` and found again; None: no cache.
    max_input_length, max_target_length: tokens kept of inputs and targets; None: what the model's positions allow.
    fewshot_seed: the k-shot training split of tasks that have them (see `training_examples`).
    """
    if kind not in REPRESENTATION_KINDS:
        raise UsageError(f"representation kind is {kind!r}; allowed: {', '.join(map(repr, REPRESENTATION_KINDS))}")
    if (model is None) == (encoder is None):
        raise UsageError(
            f"{kind} representations need exactly one of `model` (with `tokenizer`) or `encoder` (a folder)"
        )
    for option, value in (("dim", dim), ("max_examples", max_examples), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"representation option `{option}` is {value!r}; it must be a positive integer")
    if not tasks:
        raise UsageError("no tasks to compute representations of")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise UsageError(f"tasks {sorted({n for n in names if names.count(n) > 1})} appear more than once")
    if model is not None and tokenizer is None:
        raise UsageError("representations of a `model` need its `tokenizer` (the tokenizer of its training run)")
    config = model.config if model is not None else None
    if encoder is not None:
        config, folder_tokenizer = read_model_folder(encoder)
        tokenizer = tokenizer or folder_tokenizer
    pooling = sentence_pooling(encoder) if encoder is not None and kind == "text" else SentencePooling()
    examples = {task.name: training_examples(task, max_examples, fewshot_seed) for task in tasks}
    positions = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    lengths = (min(max_input_length or positions, pooling.max_length or positions), max_target_length or positions)

    path = None
    if cache_dir is not None:
        source = folder_fingerprint(encoder) if encoder is not None else model_fingerprint(model)
        fingerprint = representation_fingerprint(
            kind, source, tokenizer, examples, projection_seed=PROJECTION_SEED, dim=dim, lengths=lengths
        )
        path = Path(cache_dir) / f"{fingerprint}.pt"
        if path.is_file():
            log.info("%s representations of %d tasks loaded from the cache %s", kind, len(tasks), path)
            return load_representations(path, list(examples), dim)

    if encoder is not None:
        model = load_folder_model(encoder, config, kind)
    with _evaluation_mode(model):
        if kind == "text":
            vectors = torch.stack(
                [
                    text_vector(model, tokenizer, chosen, batch_size, lengths, normalize=pooling.normalize)
                    for chosen in examples.values()
                ]
            )
            if dim is not None and dim != vectors.shape[1]:
                vectors = vectors @ random_projection(vectors.shape[1], dim)
        else:
            fishers = [diagonal_fisher(model, tokenizer, chosen, lengths) for chosen in examples.values()]
            if dim is None:
                vectors = torch.stack([torch.cat([f.reshape(-1) for f in fisher.values()]) for fisher in fishers])
            else:
                vectors = torch.stack([count_sketch(fisher, dim) for fisher in fishers])
    vectors = vectors.float()
    if path is not None:
        save_representations(path, list(examples), vectors, kind=kind, fingerprint=path.stem, max_examples=max_examples)
        log.info("%s representations of %d tasks cached in %s", kind, len(tasks), path)
    return vectors
