"""The label-smoothed training loss and the per-example evaluation NLL, against hand-written formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe_mtl.training.losses import (
    IGNORE_INDEX,
    label_smoothed_nll,
    leave_one_out_advantage,
    reinforce_surrogate,
    route_balance,
    sequence_nll,
)


@pytest.fixture
def logits_and_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """(B=3, T=4, V=7) logits; labels padded with -100 (the second example has one target token)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 7, generator=generator) * 3
    labels = torch.tensor([[1, 4, 6, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX], [0, 0, 5, 3]])
    return logits, labels


def _by_hand(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] == IGNORE_INDEX:
                continue
            log_p = logits[b, t].double().log_softmax(-1)
            total += (1 - epsilon) * -log_p[labels[b, t]] + epsilon * -log_p.mean()
            count += 1
    return total / count


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_label_smoothed_nll_is_the_smoothed_target_cross_entropy_over_target_tokens(logits_and_labels, epsilon):
    logits, labels = logits_and_labels
    loss = label_smoothed_nll(logits, labels, epsilon)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), _by_hand(logits, labels, epsilon), rtol=1e-6, atol=0)


def test_without_smoothing_it_is_plain_cross_entropy(logits_and_labels):
    logits, labels = logits_and_labels
    plain = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.equal(label_smoothed_nll(logits, labels, 0.0), plain)


def test_padding_positions_do_not_count(logits_and_labels):
    logits, labels = logits_and_labels
    changed = logits.clone()
    changed[labels == IGNORE_INDEX] = 1e4  # garbage where the labels are padding
    assert torch.equal(label_smoothed_nll(changed, labels), label_smoothed_nll(logits, labels))


def test_half_precision_logits_are_computed_in_fp32(logits_and_labels):
    logits, labels = logits_and_labels
    loss = label_smoothed_nll(logits.half(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, label_smoothed_nll(logits.half().float(), labels))


@pytest.mark.parametrize("epsilon", [-0.1, 1.0])
def test_smoothing_outside_zero_to_one_is_an_error(logits_and_labels, epsilon):
    with pytest.raises(ValueError, match=rf"label smoothing ε is {epsilon}; it must be in \[0, 1\)"):
        label_smoothed_nll(*logits_and_labels, epsilon)


def test_sequence_nll_sums_each_examples_target_token_nll_and_counts_them(logits_and_labels):
    logits, labels = logits_and_labels
    nll, tokens = sequence_nll(logits, labels)
    log_p = logits.double().log_softmax(-1)
    expected = torch.tensor(
        [sum(-log_p[b, t, labels[b, t]] for t in range(4) if labels[b, t] != IGNORE_INDEX) for b in range(3)]
    )
    assert nll.dtype == torch.float32 and nll.shape == (3,)
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tokens, torch.tensor([3, 1, 4]))
    # the mean over tokens is the unsmoothed training loss
    torch.testing.assert_close(nll.sum() / tokens.sum(), label_smoothed_nll(logits, labels, 0.0))


def test_route_balance_is_zero_when_tasks_spread_evenly_and_ln_e_when_they_share_one_expert():
    eye = torch.eye(3)
    spread = eye[[0, 1, 2, 0, 1, 2]][:, None, :]  # 6 tasks, 1 layer: each task decided, experts used equally
    one = eye[[1] * 6][:, None, :]  # every task on expert 1
    uniform = torch.full((6, 2, 3), 1 / 3)  # undecided tasks: balanced too (the term asks nothing of one task)
    assert route_balance(spread).item() == pytest.approx(0.0, abs=1e-6)
    assert route_balance(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert route_balance(one).item() == pytest.approx(math.log(3), abs=1e-6)
    half = torch.cat([spread, one], dim=1)  # layers are averaged
    assert route_balance(half).item() == pytest.approx(math.log(3) / 2, abs=1e-6)


def test_leave_one_out_advantage_compares_each_example_with_the_rest_of_its_task():
    losses = torch.tensor([1.0, 2.0, 6.0, 5.0, 3.0])
    groups = torch.tensor([7, 7, 7, 2, 9])  # task 7 three times; tasks 2 and 9 once each
    advantage = leave_one_out_advantage(losses, groups)
    torch.testing.assert_close(advantage[:3], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    assert advantage[3:].tolist() == [0.0, 0.0]  # alone in its task: no baseline, no signal


def test_reinforce_surrogate_lowers_the_probability_of_the_worse_route():
    log_prob = torch.zeros(2, requires_grad=True)
    labels = torch.tensor([[1, 2], [1, 2]])
    logits = torch.zeros(2, 2, 4)
    logits[0, :, 1:3] = 5.0  # example 0 predicts its labels well, example 1 does not
    surrogate = reinforce_surrogate(log_prob, logits, labels, torch.tensor([0, 0]))
    assert surrogate.item() == 0.0  # log π = 0 here; only the gradient carries the estimate
    surrogate.backward()
    # descending the gradient raises log π of the better example's route and lowers the worse one's
    assert log_prob.grad[0] < 0 < log_prob.grad[1]
    nll = sequence_nll(logits, labels)[0] / 2
    torch.testing.assert_close(log_prob.grad, torch.stack([nll[0] - nll[1], nll[1] - nll[0]]) / 2)
