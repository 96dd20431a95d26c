"""MoEBartForConditionalGeneration against transformers' dense BART: parity, cost, generation, I/O."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions
from moe_mtl.models.cache_contract import GENERATION_NAME, LAYER_NAME
from moe_mtl.models.conversion import dense_name
from moe_mtl.representations.files import configured_representations, read_task_embeddings

from .conftest import generating_model, tiny_bart_config, tiny_moe

TASKS = torch.tensor([0, 1, 3])  # three examples of three different tasks
GIVEN = [[2, 2, 2, 2], [1, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 1]]  # (num_tasks=4, routed layers=4)

TASK_MODES = [
    dict(expert_unit=unit, selection=selection)
    for unit in ("layer", "ffn")
    for selection in ("softmax", "gumbel", "gumbel_st")
] + [
    dict(router="lstm"),
    dict(router="gru"),
    dict(router="transformer"),
    dict(top_k=2),
    dict(routes="average"),
    dict(routes="random", route_seed=3),
    dict(routes="given", given_routes=GIVEN),
    dict(expert_unit="ffn", routes="given", given_routes=GIVEN),
    dict(moe_layers={"encoder": [1], "decoder": [0]}),
]
TOKEN_MODES = [dict(routing="token", expert_unit="ffn", top_k=k) for k in (1, 2)]


def logits(model, batch, task_ids=TASKS):
    return model(**batch, task_ids=task_ids).logits


@pytest.mark.compat
@pytest.mark.parametrize("options", TASK_MODES + TOKEN_MODES, ids=str)
def test_from_dense_matches_dense_bart_in_eval(dense, batch, options):
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, **options).eval()
    torch.testing.assert_close(logits(moe, batch), dense(**batch).logits, atol=1e-5, rtol=0)


def test_one_expert_is_dense_bart(dense, batch):
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=1, num_tasks=4).eval()
    torch.testing.assert_close(logits(moe, batch), dense(**batch).logits, atol=1e-5, rtol=0)


def test_soft_mixture_of_identical_experts_matches_dense_in_training():
    # dropout off: the training-time path (every expert run, weights with a gradient) is still exact
    config = tiny_bart_config(dropout=0.0)
    dense = BartForConditionalGeneration(config)
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, selection="softmax").train()
    ids = torch.randint(3, 64, (2, 6))
    out = moe(input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([0, 2]))
    torch.testing.assert_close(out.logits, dense(input_ids=ids, decoder_input_ids=ids).logits, atol=1e-5, rtol=0)
    assert all(record.weights.requires_grad for record in out.routes.values())


def test_from_dense_copies_every_non_expert_weight_and_each_expert(dense):
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=2, num_tasks=2)
    reference = dense.state_dict()
    copied = 0
    for name, tensor in moe.state_dict().items():
        if dense_name(name) in reference:
            assert torch.equal(tensor, reference[dense_name(name)]), name
            copied += 1
    assert copied > len(reference)  # the expert copies come on top of one per dense weight
    assert torch.equal(moe.final_logits_bias, dense.final_logits_bias)
    assert moe.lm_head.weight is moe.model.shared.weight


def test_from_dense_accepts_a_local_directory(dense, batch, tmp_path):
    dense.save_pretrained(tmp_path / "bart")
    moe = MoEBartForConditionalGeneration.from_dense(str(tmp_path / "bart"), num_experts=2, num_tasks=4).eval()
    torch.testing.assert_close(logits(moe, batch), dense(**batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("selection", ["softmax", "gumbel", "gumbel_st"])
@pytest.mark.parametrize("router", ["mlp", "lstm", "transformer"])
def test_gradients_reach_router_and_task_table(batch, selection, router):
    model = tiny_moe(num_experts=3, num_tasks=4, selection=selection, router=router).train()
    model(**batch, task_ids=TASKS, labels=batch["decoder_input_ids"]).loss.backward()
    assert model.task_table.embedding.weight.grad.abs().sum() > 0
    for name, parameter in model.router.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_token_gates_and_task_table_get_gradients(batch):
    model = tiny_moe(num_experts=3, num_tasks=4, routing="token", expert_unit="ffn").train()
    out = model(**batch, task_ids=TASKS, labels=batch["decoder_input_ids"])
    (out.loss + out.aux_loss).backward()
    assert model.task_table.embedding.weight.grad.abs().sum() > 0
    assert model.model.encoder.layers[0].gate.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options", [dict(routes="average"), dict(routes="random"), dict(routes="given", given_routes=GIVEN)]
)
def test_fixed_routes_get_no_gradient(batch, options):
    model = tiny_moe(num_experts=3, num_tasks=4, **options).train()
    model(**batch, task_ids=TASKS, labels=batch["decoder_input_ids"]).loss.backward()
    assert model.task_table.embedding.weight.grad is None
    assert not list(model.router.parameters())


def test_frozen_task_table_gets_no_gradient(batch):
    model = tiny_moe(num_experts=3, num_tasks=4, freeze_task_table=True).train()
    model(**batch, task_ids=TASKS, labels=batch["decoder_input_ids"]).loss.backward()
    assert model.task_table.embedding.weight.grad is None
    assert model.router.network.layers[0][0].weight.grad is not None


def count_flops(model, grad: bool = False, **inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.set_grad_enabled(grad):
        model(**inputs)
    return counter.get_total_flops()


def router_flops(model, num_tasks: int) -> int:
    """Matmul FLOPs of the per-layer router MLPs for `num_tasks` distinct tasks (0 for fixed routes)."""
    if not model.router.learned:
        return 0
    weights = [p for name, p in model.router.named_parameters() if name.endswith("weight")]
    return 2 * num_tasks * sum(w.numel() for w in weights)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(expert_unit="ffn"), dict(routes="given", given_routes=GIVEN), dict(routes="random")],
    ids=str,
)
@pytest.mark.parametrize(
    ("task_ids", "use_cache"),
    [([1, 1, 1, 1], True), ([1, 1, 1, 1], False), ([0, 1, 2, 3], False)],
    ids=["one-task-cached", "one-task", "mixed-tasks"],
)
def test_hard_routed_forward_costs_what_dense_costs(options, task_ids, use_cache):
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    dense = BartForConditionalGeneration(config).eval()
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, **options).eval()
    ids = torch.randint(3, 64, (4, 32))
    dense_flops = count_flops(dense, input_ids=ids, decoder_input_ids=ids, use_cache=use_cache)
    moe_flops = count_flops(
        moe, input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor(task_ids), use_cache=use_cache
    )
    assert dense_flops > 0
    assert moe_flops <= 1.01 * dense_flops
    # the whole difference is the router, run once per distinct task
    assert moe_flops - dense_flops <= router_flops(moe, len(set(task_ids)))


def test_token_routed_top1_costs_dense_plus_its_gates():
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    dense = BartForConditionalGeneration(config).eval()
    moe = MoEBartForConditionalGeneration.from_dense(
        dense, num_experts=3, num_tasks=4, routing="token", expert_unit="ffn", task_dim=16
    ).eval()
    ids = torch.randint(3, 64, (4, 16))
    dense_flops = count_flops(dense, input_ids=ids, decoder_input_ids=ids)
    moe_flops = count_flops(moe, input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([0, 1, 2, 3]))
    gate_flops = 4 * 2 * ids.numel() * (64 + 16) * 3  # 4 routed layers, one (d + t) x E matmul per token
    assert moe_flops <= 1.01 * dense_flops + gate_flops


def test_learned_routes_in_training_run_every_expert():
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    dense = BartForConditionalGeneration(config)
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4)
    ids = torch.randint(3, 64, (4, 16))
    inputs = dict(input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([1, 1, 1, 1]))
    eval_flops = count_flops(moe.eval(), grad=True, **inputs)
    train_flops = count_flops(moe.train(), grad=True, **inputs)
    assert train_flops > 2 * eval_flops  # 3 experts in every layer; only the lm head is shared


@pytest.mark.parametrize("selection", ["switch", "reinforce"])
def test_sparse_stage_one_costs_what_dense_training_costs(selection):
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    dense = BartForConditionalGeneration(config)
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, selection=selection).train()
    ids = torch.randint(3, 64, (8, 16))
    flops = count_flops(moe, grad=True, input_ids=ids, decoder_input_ids=ids, task_ids=torch.full((8,), 1))
    dense_flops = count_flops(dense.train(), grad=True, input_ids=ids, decoder_input_ids=ids)
    assert flops <= 1.01 * dense_flops + router_flops(moe, 1)


def greedy_by_hand(model, input_ids, task_ids, steps):
    decoded = torch.full((input_ids.shape[0], 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):
            next_logits = model(
                input_ids=input_ids, decoder_input_ids=decoded, task_ids=task_ids, use_cache=False
            ).logits
            decoded = torch.cat([decoded, next_logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return decoded


GENERATE_MODES = [
    dict(routes="given", given_routes=GIVEN),
    dict(),
    dict(expert_unit="ffn"),
    dict(routes="average"),
    dict(routing="token", expert_unit="ffn", top_k=2),
    dict(selection="softmax", freeze_router=True, temperature=3.0),  # stage two's soft routes: every expert runs
]


@pytest.mark.compat
@pytest.mark.parametrize("options", GENERATE_MODES, ids=str)
def test_generate_matches_greedy_decoding_by_hand(options):
    model = generating_model(**options)
    input_ids, task_ids = torch.randint(3, 64, (3, 7)), torch.tensor([0, 1, 3])
    generated = model.generate(input_ids, task_ids=task_ids, max_new_tokens=6, do_sample=False, num_beams=1)
    assert torch.equal(generated, greedy_by_hand(model, input_ids, task_ids, 6))


@pytest.mark.compat
@pytest.mark.parametrize("options", GENERATE_MODES[:3], ids=str)
def test_beam_search_with_cache_matches_beam_search_without(options):
    model = generating_model(**options)
    input_ids, task_ids = torch.randint(3, 64, (3, 7)), torch.tensor([0, 1, 3])
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    cached = model.generate(input_ids, task_ids=task_ids, **kwargs)
    uncached = model.generate(input_ids, task_ids=task_ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_tasks_with_different_routes_generate_differently():
    model = generating_model(routes="given", given_routes=GIVEN)
    input_ids = torch.randint(3, 64, (1, 7)).expand(2, -1)
    generated = model.generate(input_ids, task_ids=torch.tensor([0, 2]), max_new_tokens=6, do_sample=False)
    assert not torch.equal(generated[0], generated[1])


@pytest.mark.parametrize(
    "options",
    [dict(), dict(router="lstm", expert_unit="ffn"), dict(routes="random"), dict(routing="token", expert_unit="ffn")],
    ids=str,
)
@pytest.mark.compat
def test_save_and_load_give_identical_outputs(batch, tmp_path, options):
    model = tiny_moe(num_experts=3, num_tasks=4, **options).eval()
    model.set_temperature(0.25)
    model.save_pretrained(tmp_path)
    loaded = MoEBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.moe == model.config.moe
    assert torch.equal(logits(loaded, batch), logits(model, batch))
    if loaded.router is not None and loaded.router.learned:
        assert loaded.router.temperature.item() == 0.25


def test_given_task_representations_initialise_the_table(tmp_path, batch):
    vectors = torch.randn(4, 12)
    torch.save(vectors, tmp_path / "tasks.pt")
    options = MoEOptions(num_experts=2, num_tasks=4, task_embeddings=str(tmp_path / "tasks.pt"))
    read = configured_representations(options, None)  # models read no files: the caller does
    model = MoEBartForConditionalGeneration(MoEBartConfig.from_bart_config(tiny_bart_config(), options), read)
    assert torch.equal(model.task_table.embedding.weight, vectors)
    model.save_pretrained(tmp_path / "model")
    assert torch.equal(
        MoEBartForConditionalGeneration.from_pretrained(tmp_path / "model").task_table.embedding.weight, vectors
    )


@pytest.mark.parametrize(
    ("task_ids", "message"),
    [
        (torch.tensor([0, 1, 4]), r"task ids: 0 to 3"),
        (torch.tensor([0, -1, 2]), r"task ids: 0 to 3"),
        (torch.tensor([0, 1]), r"`task_ids` has shape \(2,\); expected \(3,\)"),
        (torch.tensor([0.0, 1.0, 2.0]), r"`task_ids` must be a LongTensor"),
        (None, r"`task_ids` is required"),
    ],
)
def test_bad_task_ids_are_named(batch, task_ids, message):
    model = tiny_moe(num_experts=2, num_tasks=4)
    with pytest.raises(ValueError, match=message):
        model(**batch, task_ids=task_ids)


def test_mismatched_attention_mask_is_named(batch):
    model = tiny_moe(num_experts=2, num_tasks=4)
    with pytest.raises(ValueError, match=r"`attention_mask` has shape \(3, 6\); expected \(3, 7\)"):
        model(**{**batch, "attention_mask": batch["attention_mask"][:, :6]}, task_ids=TASKS)


def test_generate_checks_task_ids():
    model = tiny_moe(num_experts=2, num_tasks=4).eval()
    with pytest.raises(ValueError, match=r"task ids: 0 to 3"):
        model.generate(torch.randint(3, 64, (2, 5)), task_ids=torch.tensor([0, 9]), max_new_tokens=2)


def test_auto_model_loads_a_saved_moe_bart(batch, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = tiny_moe(num_experts=2, num_tasks=4).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MoEBartForConditionalGeneration)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_plain_encoder_states_are_routed_from_task_ids(batch):
    model = tiny_moe(num_experts=3, num_tasks=4).eval()
    full = model(**batch, task_ids=TASKS)
    states = (full.encoder_last_hidden_state,)
    again = model(
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        encoder_outputs=states,
        task_ids=TASKS,
    )
    assert torch.equal(again.logits, full.logits)
    assert again.routes.keys() == {"decoder.0", "decoder.1"}


@pytest.mark.parametrize("options", [dict(), dict(routing="token", expert_unit="ffn")], ids=str)
def test_the_encoder_takes_given_routes_instead_of_task_ids(batch, options):
    encoder = tiny_moe(num_experts=3, num_tasks=4, **options).eval().model.encoder
    routes, task_representations = encoder.route(TASKS)
    given = {"routes": routes} if routes is not None else {"task_representations": task_representations}
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    out = encoder(**inputs, **given)
    reference = encoder(**inputs, task_ids=TASKS)
    assert torch.equal(out.last_hidden_state, reference.last_hidden_state)
    name, value = next(iter(given.items()))
    with pytest.raises(ValueError, match=rf"given `{name}` have shape \(2, .*\); expected \(3, "):
        encoder(**inputs, **{name: value[:2]})
    with pytest.raises(ValueError, match=rf"routing takes given `{name}`"):
        encoder(**inputs, routes=torch.ones(3, 4, 3), task_representations=torch.ones(3, 128))


def test_layerdrop_is_refused_not_ignored():
    with pytest.raises(ValueError, match=r"`encoder_layerdrop` is 0.1; MoE-BART supports only 0.0"):
        tiny_moe(tiny_bart_config(encoder_layerdrop=0.1), num_experts=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(routing="token", expert_unit="ffn", capacity_factor=2.0)], ids=str)
def test_a_model_cast_to_half_precision_routes(options, dtype):
    dense = BartForConditionalGeneration(tiny_bart_config()).to(dtype)
    model = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, **options)
    assert model.dtype == dtype
    ids = torch.randint(3, 64, (2, 6))
    for mode in (model.eval(), model.train()):
        out = mode(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 3]))
        assert torch.isfinite(out.logits.float()).all()
        assert all(record.weights.dtype == torch.float32 for record in out.routes.values())


def test_from_pretrained_keeps_the_task_table_frozen(tmp_path):
    tiny_moe(num_experts=2, num_tasks=3, freeze_task_table=True).save_pretrained(tmp_path)
    loaded = MoEBartForConditionalGeneration.from_pretrained(tmp_path)
    assert not loaded.task_table.embedding.weight.requires_grad


def test_task_representations_travel_with_the_checkpoint_not_the_file(dense, batch, tmp_path):
    vectors = torch.randn(4, 12)
    torch.save(vectors, tmp_path / "tasks.pt")
    read = read_task_embeddings(tmp_path / "tasks.pt", 4)
    model = MoEBartForConditionalGeneration.from_dense(
        dense, read, num_experts=2, num_tasks=4, task_embeddings=str(tmp_path / "tasks.pt")
    ).eval()
    assert (model.moe_options.task_dim, model.moe_options.task_embeddings) == (12, None)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "tasks.pt").unlink()
    loaded = MoEBartForConditionalGeneration.from_pretrained(tmp_path / "model").eval()
    assert torch.equal(loaded.task_table.embedding.weight, vectors)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_the_model_reads_no_representation_file(tmp_path):
    torch.save(torch.randn(4, 12), tmp_path / "tasks.pt")
    with pytest.raises(ValueError, match=r"`task_embeddings` is .*tasks.pt', but the model reads no file"):
        tiny_moe(num_experts=2, num_tasks=4, task_embeddings=str(tmp_path / "tasks.pt"))


def test_tensor_task_representations_must_have_a_row_per_task(dense):
    with pytest.raises(ValueError, match=r"task representations have shape \(3, 5\); expected \(num_tasks=4, dim\)"):
        MoEBartForConditionalGeneration.from_dense(
            dense, task_representations=torch.randn(3, 5), num_experts=2, num_tasks=4
        )


def test_from_dense_keeps_the_generation_defaults(dense):
    dense.generation_config.num_beams, dense.generation_config.no_repeat_ngram_size = 4, 3
    model = MoEBartForConditionalGeneration.from_dense(dense, num_experts=2, num_tasks=2)
    assert (model.generation_config.num_beams, model.generation_config.no_repeat_ngram_size) == (4, 3)


def test_from_dense_reads_a_safetensors_state_without_tied_keys(dense, batch, tmp_path):
    from safetensors.torch import load_file

    dense.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    assert "model.encoder.embed_tokens.weight" not in state
    moe = tiny_moe(num_experts=2, num_tasks=4)
    moe.load_dense_state_dict(state)
    torch.testing.assert_close(logits(moe.eval(), batch), dense(**batch).logits, atol=1e-5, rtol=0)


def test_a_plain_forward_fills_no_cache_and_costs_dense_for_mixed_tasks():
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    dense = BartForConditionalGeneration(config).eval()
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, routes="random").eval()
    ids = torch.randint(3, 64, (4, 32))
    inputs = dict(input_ids=ids, decoder_input_ids=ids)
    assert getattr(moe(**inputs, task_ids=torch.tensor([0, 1, 2, 3])), GENERATION_NAME) is None
    assert count_flops(moe, **inputs, task_ids=torch.tensor([0, 1, 2, 3])) <= count_flops(
        dense, **inputs, use_cache=False
    )


def test_static_caches_are_refused_for_whole_layer_experts():
    model = tiny_moe(num_experts=2, num_tasks=2).eval()
    with pytest.raises(ValueError, match=r"cache_implementation='static' .* need 4 slots; allowed: 'dynamic'"):
        model.generate(
            torch.randint(3, 64, (1, 5)), task_ids=torch.tensor([0]), max_new_tokens=2, cache_implementation="static"
        )


@pytest.mark.parametrize("unit", ["layer", "ffn"])
def test_expert_parameters_are_those_of_one_expert(unit):
    model = tiny_moe(num_experts=3, num_tasks=2, expert_unit=unit)
    named = dict(model.named_parameters())
    expected = {id(p) for name, p in named.items() if name.startswith("model.decoder.layers.1.experts.2.")}
    assert expected and {id(p) for p in model.expert_parameters("decoder.1", 2)} == expected


@pytest.mark.parametrize(
    "options",
    [
        dict(selection="softmax", freeze_router=True, temperature=3.0),
        dict(selection="argmax", freeze_router=True),
        dict(routes="average"),
        dict(routes="random"),
        dict(routes="given", given_routes=[[2, 2, 2, 2], [1, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 1]]),
    ],
    ids=str,
)
def test_fixed_routes_give_the_same_logits_in_training_and_evaluation(batch, options):
    """What evaluation scores (and checkpoint selection picks) is the network training trained: at dropout 0,
    fixed routes (a frozen router's soft or hard routes, the fixed sources) give identical logits in train and
    eval mode, also through a save and load, and generation runs the same routes."""
    model = tiny_moe(tiny_bart_config(dropout=0.0), num_experts=3, num_tasks=4, **options)
    task_ids = torch.tensor([0, 1, 3])
    training = model.train()(**batch, task_ids=task_ids)
    evaluation = model.eval()(**batch, task_ids=task_ids)
    torch.testing.assert_close(evaluation.logits, training.logits, rtol=0, atol=0)
    for layer, record in training.routes.items():
        torch.testing.assert_close(evaluation.routes[layer].weights, record.weights, rtol=0, atol=0)


def test_soft_stage_two_routes_survive_save_and_load(batch, tmp_path):
    model = tiny_moe(num_experts=3, num_tasks=4, selection="softmax", freeze_router=True, temperature=3.0).eval()
    model.save_pretrained(tmp_path)
    loaded = MoEBartForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.router.frozen and not any(p.requires_grad for p in loaded.router.parameters())
    task_ids = torch.tensor([0, 1, 3])
    out = loaded(**batch, task_ids=task_ids)
    torch.testing.assert_close(out.logits, model(**batch, task_ids=task_ids).logits)
    assert all(bool((record.weights > 0).all()) for record in out.routes.values())  # soft: every expert has weight


@pytest.mark.compat
@torch.no_grad()  # as generate runs it
def test_forward_takes_the_cache_as_the_installed_release_passes_it_and_refuses_unknown_arguments(batch):
    """transformers 5.24 renamed the cache `past_key_values` → `cache` in `generate`, model outputs and BART's
    layers; the model takes either name, hands the cache back where the installed `generate` reads it, and an
    argument it cannot honour is an error, not ignored."""
    assert LAYER_NAME == GENERATION_NAME  # one release speaks one name
    model = tiny_moe(num_experts=2, num_tasks=4).eval()
    encoder_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    task_ids, prefix = torch.tensor([0, 1, 3]), batch["decoder_input_ids"]
    cache = getattr(
        model(**encoder_inputs, decoder_input_ids=prefix, task_ids=task_ids, use_cache=True), GENERATION_NAME
    )
    assert cache is not None and cache.get_seq_length() == prefix.shape[1]

    token = torch.randint(3, 64, (3, 1))
    step = dict(**encoder_inputs, decoder_input_ids=token, task_ids=task_ids)
    new, legacy = model(**step, cache=copy.deepcopy(cache)), model(**step, past_key_values=copy.deepcopy(cache))
    assert torch.equal(new.logits, legacy.logits)
    whole = model(**encoder_inputs, decoder_input_ids=torch.cat([prefix, token], 1), task_ids=task_ids)
    torch.testing.assert_close(new.logits[:, -1], whole.logits[:, -1])

    with pytest.raises(ValueError, match="pass the key/value cache once, as `cache`"):
        model(**step, cache=cache, past_key_values=cache)
    with pytest.raises(ValueError, match=r"MoE-BART's forward does not take \['cu_seq_lens_q'\]"):
        model(**step, cu_seq_lens_q=torch.tensor([0, 3]))
