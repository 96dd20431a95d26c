"""The key/value cache of MoE-BART's generation: a slot per whole-layer decoder expert, holding only its own rows.

Each whole-layer decoder expert has its own cache slot (its layers' `layer_idx`). A slot holds the rows (examples,
with their beams) that route to that expert (or, for a grouped layer, the first expert's slot holds every row,
sorted by expert), so a mixed-task batch runs each expert on its own rows at every
decoding step, and generation costs what dense BART does. Routes are fixed for a whole `generate` call, and the
beams of one example share its route, so a slot's rows never change; beam search only permutes the beams of each
example, and `reorder_cache` maps that permutation into each slot.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache


class RoutedCache(EncoderDecoderCache):
    """An `EncoderDecoderCache` (self- and cross-attention `DynamicCache`s) whose slots may hold a subset of rows."""

    def __init__(self) -> None:
        super().__init__(DynamicCache(), DynamicCache())
        # slot → the batch rows it holds, in its order; absent: every row in batch order
        self.slot_rows: dict[int, torch.Tensor] = {}
        # slot → what its layer read from its routes (`layers.LayerPlan`): routes are fixed for a `generate` call
        self.layer_plans: dict[int, object] = {}

    def hold_rows(self, slot: int, rows: torch.Tensor | None) -> None:
        """Slot `slot` holds the batch rows `rows`, in that order (None: all of them, in batch order): an expert's own
        rows ascending, or every row sorted by expert (a grouped layer). Set before the slot is written."""
        if rows is None:
            self.slot_rows.pop(slot, None)
        else:
            self.slot_rows[slot] = rows

    def slot_index(self, slot: int, beam_idx: torch.Tensor) -> torch.Tensor:
        """Which of slot `slot`'s own rows each of its rows takes after the batch is reordered by `beam_idx`."""
        rows = self.slot_rows.get(slot)
        if rows is None:
            return beam_idx
        rows = rows.to(beam_idx.device)
        position = torch.full_like(beam_idx, -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows), device=beam_idx.device)
        index = position[beam_idx[rows]]
        if bool((index < 0).any()):
            raise ValueError("beam reordering moved a row into another expert's slot: an example's beams share a route")
        return index

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for slot in range(max(len(self.self_attention_cache.layers), len(self.cross_attention_cache.layers))):
            index = self.slot_index(slot, beam_idx)
            for cache in (self.self_attention_cache, self.cross_attention_cache):
                if slot < len(cache.layers):
                    cache.layers[slot].reorder_cache(index)

    def _whole_batch_only(self, method: str) -> None:
        if self.slot_rows:
            raise NotImplementedError(
                f"`{method}` of a cache whose expert slots hold part of the batch (slots {sorted(self.slot_rows)}); "
                "MoE-BART's generation supports greedy search, sampling and beam search"
            )

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._whole_batch_only("batch_repeat_interleave")
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._whole_batch_only("batch_select_indices")
        super().batch_select_indices(indices)
