"""Mixing expert outputs: which experts run on which rows, and the weighted sum."""

import torch

from moe_mtl.models.experts import FeedForward, mix_experts


def recording_experts(scales):
    calls = []

    def run(e, index):
        calls.append((e, None if index is None else index.tolist()))
        rows = x if index is None else x[index]
        return rows * scales[e]

    x = torch.arange(12.0).view(4, 3)
    return x, run, calls


def test_hard_routes_run_each_expert_on_its_own_rows():
    x, run, calls = recording_experts([1.0, 10.0, 100.0])
    weights = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 0, 1.0]])
    out = mix_experts(run, weights)
    assert calls == [(0, [0, 2]), (2, [1, 3])]  # expert 1 unused: never run
    assert torch.equal(out, torch.stack([x[0], 100 * x[1], x[2], 100 * x[3]]))


def test_a_route_used_by_every_row_runs_once_on_the_whole_batch():
    x, run, calls = recording_experts([1.0, 2.0])
    out = mix_experts(run, torch.tensor([[0.0, 1.0]] * 4))
    assert calls == [(1, None)] and torch.equal(out, 2 * x)


def test_run_all_and_no_subset_run_full_batches():
    x, run, calls = recording_experts([1.0, 2.0, 3.0])
    weights = torch.tensor([[0.5, 0.5, 0.0]] * 2 + [[0.0, 1.0, 0.0]] * 2)
    out = mix_experts(run, weights, run_all=True)
    assert calls == [(0, None), (1, None), (2, None)]
    expected = torch.cat([1.5 * x[:2], 2 * x[2:]])
    torch.testing.assert_close(out, expected)
    calls.clear()
    torch.testing.assert_close(mix_experts(run, weights, subset=False), expected)
    assert calls == [(0, None), (1, None)]


def test_hard_routes_give_the_weighted_sum_and_pass_gradients_to_the_experts():
    x, run, _ = recording_experts([1.0, 10.0, 100.0])
    hard = torch.tensor([[0.0, 1.0, 0], [0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
    placed = mix_experts(run, hard)  # a partition: each row's expert output put in place
    weighted = mix_experts(run, hard.clone().requires_grad_())  # the weighted sum, for the weights' gradient
    assert torch.equal(placed, weighted)
    # an expert's gradient still flows through the placed output (reinforce: no gradient through the weights)
    scale = torch.tensor(2.0, requires_grad=True)
    mix_experts(lambda e, index: scale * x[index] if index is not None else scale * x, hard).sum().backward()
    assert scale.grad == x.sum()


def test_feed_forward_matches_bart_ffn_arithmetic():
    ffn = FeedForward(8, 16, "gelu", activation_dropout=0.0, dropout=0.0)
    x = torch.randn(2, 3, 8)
    expected = ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x)))
    torch.testing.assert_close(ffn(x), expected)
