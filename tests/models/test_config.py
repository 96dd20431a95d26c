"""MoE options: validation messages name the option and the allowed values; config round trip."""

import pytest

from moe_mtl import MoEBartConfig, MoEOptions

from .conftest import tiny_bart_config


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(routing="expert"), r"`routing` is 'expert'; allowed values: 'task', 'token'"),
        (dict(expert_unit="block"), r"`expert_unit` is 'block'; allowed values: 'layer', 'ffn'"),
        (dict(router="cnn"), r"`router` is 'cnn'; allowed values: 'mlp', 'lstm', 'gru', 'transformer'"),
        (dict(selection="hard"), r"`selection` is 'hard'; allowed values: 'softmax', 'gumbel', 'gumbel_st', 'argmax'"),
        (dict(routes="fixed"), r"`routes` is 'fixed'; allowed values: 'learned', 'average', 'random', 'given'"),
        (dict(num_experts=0), r"`num_experts` is 0; it must be a positive integer"),
        (dict(num_tasks=2.5), r"`num_tasks` is 2.5; it must be a positive integer"),
        (dict(top_k=4, num_experts=3), r"`top_k` is 4; allowed values: 1, 2, 3 \(num_experts=3"),
        (dict(routing="token", expert_unit="ffn", top_k=3), r"`top_k` is 3; allowed values: 1, 2 "),
        (dict(routing="token", expert_unit="ffn", top_k=2, num_experts=1), r"`top_k` is 2; allowed values: 1 "),
        (dict(top_k=True), r"`top_k` is True"),
        (dict(routing="token"), r"`expert_unit` is 'layer'.*allowed values with routing='token': 'ffn'"),
        (dict(temperature=0.0), r"`temperature` is 0.0; it must be a number > 0"),
        (dict(temperature="a"), r"`temperature` is 'a'; it must be a number > 0"),
        (dict(routing="token", expert_unit="ffn", capacity_factor=-1.0), r"`capacity_factor` is -1.0"),
        (dict(capacity_factor=1.0), r"`capacity_factor` applies only to routing='token'"),
        (dict(moe_layers={"encoder": 1}), r"`moe_layers`: encoder is 1; it must be a list of layer indices"),
        (dict(moe_layers={"encoder": [], "decoder": []}), r"`moe_layers` routes no layer"),
        (dict(routes="given"), r"`given_routes` must be set exactly when routes='given'"),
        (dict(freeze_router=True), r"`selection` is 'gumbel_st', but a frozen router .* allowed with freeze_router"),
        (dict(freeze_router=True, selection="softmax", routes="average"), r"`freeze_router` applies only to learned"),
        (dict(moe_layers={"middle": [0]}), r"`moe_layers` has keys \['middle'\]; allowed keys: 'encoder', 'decoder'"),
    ],
)
def test_invalid_options_name_the_option_and_the_allowed_values(options, message):
    with pytest.raises(ValueError, match=message):
        MoEOptions(**options)


def test_unknown_option_names_are_listed():
    with pytest.raises(ValueError, match=r"unknown MoE options \['experts'\]; allowed options: .*num_experts"):
        MoEOptions.from_dict({"experts": 3})


def test_routed_layers_default_to_all_and_are_checked():
    assert MoEOptions().routed_layers("encoder", 3) == [0, 1, 2]
    assert MoEOptions(moe_layers={"encoder": [2, 0]}).routed_layers("encoder", 3) == [0, 2]
    assert MoEOptions(moe_layers={"encoder": [1]}).routed_layers("decoder", 3) == []
    with pytest.raises(ValueError, match=r"`moe_layers` names decoder layers \[5\]; allowed: 0 to 2"):
        MoEOptions(moe_layers={"decoder": [5]}).routed_layers("decoder", 3)


def test_config_keeps_bart_shape_and_moe_options_through_save_and_load(tmp_path):
    options = MoEOptions(num_experts=2, num_tasks=5, expert_unit="ffn", router="gru")
    config = MoEBartConfig.from_bart_config(tiny_bart_config(), options)
    config.save_pretrained(tmp_path)
    loaded = MoEBartConfig.from_pretrained(tmp_path)
    assert loaded.moe_options == options
    assert (loaded.d_model, loaded.encoder_layers, loaded.vocab_size) == (32, 2, 64)
    assert loaded.model_type == "moe_bart"


def test_config_rejects_bad_moe_dict():
    with pytest.raises(ValueError, match=r"`routing` is 'x'"):
        MoEBartConfig(moe={"routing": "x"})


@pytest.mark.parametrize(
    "options, option",
    [
        (dict(routes="random", temperature=2.0), "temperature"),
        (dict(routes="average", router="gru"), "router"),
        (dict(routes="given", given_routes=[[0]], num_experts=2, selection="softmax"), "selection"),
        (dict(routing="token", expert_unit="ffn", router_hidden=32), "router_hidden"),
        (dict(routing="token", expert_unit="ffn", routes="average"), "routes"),
    ],
    ids=str,
)
def test_an_option_these_options_never_read_is_said_with_its_default(options, option):
    with pytest.warns(
        UserWarning, match=rf"MoE option `{option}` is .*, which does nothing: .*; leave it at its default"
    ):
        MoEOptions(**options)


def test_options_that_are_read_say_nothing():
    for options in (dict(), dict(temperature=2.0, router="gru"), dict(routes="average", route_seed=3)):
        assert MoEOptions(**options).unread() == []
