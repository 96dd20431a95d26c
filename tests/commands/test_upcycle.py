"""`moe-mtl upcycle` (`moe_mtl.commands.upcycle`): a dense BART as a saved MoE-BART."""

import pytest
import torch
from transformers import BartForConditionalGeneration

from moe_mtl import MoEBartForConditionalGeneration
from moe_mtl.cli import main

from ..models.conftest import tiny_bart_config


def test_upcycle_saves_a_moe_bart_that_matches_the_dense_model(tmp_path, capsys):
    dense = BartForConditionalGeneration(tiny_bart_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    main(
        [
            "upcycle",
            f"--dense={tmp_path / 'dense'}",
            f"--output={tmp_path / 'moe'}",
            "--moe.num_experts=2",
            "--moe.num_tasks=3",
            "--moe.expert_unit=ffn",
            "--moe.router=gru",
        ]
    )
    assert "saved MoE-BART (2 experts; routed: encoder.0, encoder.1, decoder.0, decoder.1)" in capsys.readouterr().out
    moe = MoEBartForConditionalGeneration.from_pretrained(tmp_path / "moe").eval()
    assert (moe.moe_options.num_experts, moe.moe_options.num_tasks, moe.moe_options.router) == (2, 3, "gru")
    ids = torch.randint(3, 64, (2, 6))
    out = moe(input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([0, 2])).logits
    torch.testing.assert_close(out, dense(input_ids=ids, decoder_input_ids=ids).logits, atol=1e-5, rtol=0)


def test_upcycle_rejects_an_unknown_option_value(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["upcycle", "--dense=x", f"--output={tmp_path}", "--moe.routing=expert"])
    error = capsys.readouterr().err
    assert "moe.routing" in error and "task" in error and "token" in error


def test_upcycle_reports_an_invalid_option_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["upcycle", "--dense=x", f"--output={tmp_path}", "--moe.num_experts=0"])
    assert "MoE option `num_experts` is 0; it must be a positive integer" in capsys.readouterr().err
