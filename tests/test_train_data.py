"""Batching of sparse KD targets against a plain per-row placement."""

from __future__ import annotations

import torch

from agentkd.training.objectives import SparseTargets
from agentkd.training.train_data import EncodedRow, collate_targets


def targets(n: int, k: int, seed: int) -> SparseTargets:
    g = torch.Generator().manual_seed(seed)
    return SparseTargets(ids=torch.randint(0, 50, (n, k), generator=g).to(torch.int32),
                         probs=torch.rand(n, k, generator=g), tail=torch.rand(n, generator=g))


def placed_row_by_row(rows, tgts, width):
    k = max(t.ids.size(-1) for t in tgts if t is not None)
    ids, probs, tail = torch.zeros(len(rows), width, k, dtype=torch.long), torch.zeros(len(rows), width, k), \
        torch.zeros(len(rows), width)
    for i, (row, t) in enumerate(zip(rows, tgts)):
        if t is None:
            continue
        for j in range(min(len(row.input_ids) - row.start, t.ids.size(0))):
            w = t.ids.size(-1)
            ids[i, row.start + j, :w], probs[i, row.start + j, :w] = t.ids[j].long(), t.probs[j]
            tail[i, row.start + j] = t.tail[j]
    return ids, probs, tail


def test_collate_targets_places_each_row_at_its_response_positions():
    rows = [EncodedRow(list(range(9)), [-100] * 4 + list(range(5)), 4),  # targets for all 5 positions
            EncodedRow(list(range(6)), [-100] * 2 + list(range(4)), 2),  # no targets: NLL only
            EncodedRow(list(range(7)), [-100] * 5 + list(range(2)), 5),  # cut by max_len: 2 of 6 positions left
            EncodedRow(list(range(8)), [-100] * 3 + list(range(5)), 3)]  # a narrower support than the others
    tgts = [targets(5, 6, 0), None, targets(6, 6, 1), targets(5, 3, 2)]
    got = collate_targets(rows, tgts, width=10)
    want = placed_row_by_row(rows, tgts, 10)
    for key, ref in zip(("target_ids", "target_probs", "target_tail"), want):
        assert torch.equal(got[key], ref), key
    assert got["target_tail"][1].abs().sum().item() == 0.0 and got["target_tail"][2, 5:7].gt(0).all()
