"""RoutedCache: expert cache slots that hold only their own rows, so mixed-task generation costs what dense does."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BartForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from moe_mtl import MoEBartForConditionalGeneration
from moe_mtl.models.cache_contract import GENERATION_NAME
from moe_mtl.models.routed_cache import RoutedCache

from .conftest import generating_model, tiny_bart_config

GIVEN = [[2, 2, 2, 2], [1, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 1]]  # (num_tasks=4, routed layers=4)
MODES = [dict(routes="given", given_routes=GIVEN), dict(), dict(routes="random", route_seed=1), dict(top_k=2)]


def whole_batch_cache():
    """The cache generation used before: every used expert's slot holds the whole batch."""
    return {GENERATION_NAME: EncoderDecoderCache(DynamicCache(), DynamicCache())}


@pytest.mark.compat
@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "beam4"])
@pytest.mark.parametrize("options", MODES, ids=str)
def test_mixed_task_generation_is_unchanged_by_row_slots(options, num_beams):
    model = generating_model(**options)
    input_ids, task_ids = torch.randint(3, 64, (6, 7)), torch.tensor([0, 1, 3, 2, 1, 0])
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    routed = model.generate(input_ids, task_ids=task_ids, **kwargs)
    assert torch.equal(routed, model.generate(input_ids, task_ids=task_ids, **kwargs, **whole_batch_cache()))
    # and each row as if generated alone: rows of a mixed batch do not see each other
    for row in range(len(task_ids)):
        alone = model.generate(input_ids[row : row + 1], task_ids=task_ids[row : row + 1], **kwargs)
        assert torch.equal(routed[row : row + 1, : alone.shape[1]], alone)


def generation_flops(model, input_ids, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        model.generate(input_ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "beam4"])
@pytest.mark.parametrize(
    "options", [dict(routes="given", given_routes=GIVEN), dict(expert_unit="ffn", routes="random")], ids=str
)
def test_mixed_task_generation_costs_what_dense_costs(options, num_beams):
    config = tiny_bart_config(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, forced_eos_token_id=None)
    dense = BartForConditionalGeneration(config).eval()
    moe = MoEBartForConditionalGeneration.from_dense(dense, num_experts=3, num_tasks=4, **options).eval()
    ids = torch.randint(3, 64, (4, 12))
    dense_flops = generation_flops(dense, ids, num_beams=num_beams)
    moe_flops = generation_flops(moe, ids, task_ids=torch.tensor([0, 1, 2, 3]), num_beams=num_beams)
    old_flops = generation_flops(
        moe, ids, task_ids=torch.tensor([0, 1, 2, 3]), num_beams=num_beams, **whole_batch_cache()
    )
    assert moe_flops <= 1.01 * dense_flops
    if options.get("routes") == "given":  # whole-layer experts: whole-batch slots ran each used expert on every row
        assert old_flops > 1.5 * dense_flops


def test_a_slot_maps_beam_reordering_into_its_own_rows():
    cache = RoutedCache()
    cache.hold_rows(0, torch.tensor([2, 3, 6, 7]))  # examples 1 and 3 of 4, 2 beams each
    cache.hold_rows(1, None)
    beam_idx = torch.tensor([1, 1, 3, 2, 4, 4, 7, 6])
    # slot 0's rows 2, 3, 6, 7 take global rows 3, 2, 7, 6: its own positions 1, 0, 3, 2
    assert cache.slot_index(0, beam_idx).tolist() == [1, 0, 3, 2]
    assert torch.equal(cache.slot_index(1, beam_idx), beam_idx)
    with pytest.raises(ValueError, match="another expert's slot"):
        cache.slot_index(0, torch.tensor([0, 0, 0, 0, 4, 4, 6, 6]))  # row 2 would take row 0, of another route


def test_a_slot_reorders_its_keys_by_its_own_rows():
    cache = RoutedCache()
    cache.hold_rows(0, torch.tensor([2, 3]))  # example 1's two beams, of 2 examples
    keys = torch.tensor([5.0, 7.0]).view(2, 1, 1, 1).expand(2, 1, 3, 2).clone()  # slot rows hold 5 and 7
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        part.update(keys, keys.clone(), 0)
    cache.reorder_cache(torch.tensor([1, 1, 3, 3]))  # both beams of each example continue its second beam
    for part in (cache.self_attention_cache, cache.cross_attention_cache):
        assert part.layers[0].keys[:, 0, 0, 0].tolist() == [7.0, 7.0]
        assert part.layers[0].values[:, 0, 0, 0].tolist() == [7.0, 7.0]


def test_batch_selection_is_refused_once_a_slot_holds_part_of_the_batch():
    cache = RoutedCache()
    cache.batch_repeat_interleave(2)  # no partial slot yet: as EncoderDecoderCache
    cache.hold_rows(0, torch.tensor([1]))
    with pytest.raises(NotImplementedError, match=r"batch_select_indices. .* \(slots \[0\]\)"):
        cache.batch_select_indices(torch.tensor([0]))
