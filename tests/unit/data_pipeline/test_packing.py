"""Unit: packing bins, packed rows, and attention isolation of packed documents."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.packing import best_fit_decreasing, chunk_documents, pack_rows


def test_best_fit_decreasing_by_hand():
    # Sorted: 6(i0) 5(i2) 4(i3) 3(i1) 2(i4) into capacity 8:
    # 6 -> bin0 (room 2); 5 -> bin1 (room 3); 4 -> bin2 (room 4); 3 -> bin1 (fullest that fits, room 0);
    # 2 -> bin0 (room 0).
    assert best_fit_decreasing([6, 3, 5, 4, 2], 8) == [[0, 4], [2, 1], [3]]


def test_best_fit_decreasing_rejects_an_item_larger_than_a_row():
    with pytest.raises(ValueError, match="more than the row length"):
        best_fit_decreasing([9], 8)


def test_pack_rows_positions_restart_and_first_label_is_masked():
    samples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [-100, 5])]
    ids, labels, pos, filled = pack_rows(samples, [[0, 1]], 6, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 0]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    assert labels.tolist() == [[-100, 2, 3, -100, 5, -100]]
    assert filled.tolist() == [5]


def test_chunk_documents_splits_across_rows():
    docs = [([1, 2, 3, 4, 5], [1, 2, 3, 4, 5]), ([6, 7], [6, 7])]
    rows = chunk_documents(docs, 4)
    assert [[p[0] for p in row] for row in rows] == [[[1, 2, 3, 4]], [[5], [6, 7]]]


def test_packed_documents_do_not_attend_to_each_other():
    """With position_ids restarting per document (no attention mask, no cache), each document's logits
    equal its stand-alone logits: transformers builds the block-diagonal mask."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="sdpa",
        )
    ).eval()
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    ids, _, pos, _ = pack_rows([(a, a), (b, b)], [[0, 1]], 10, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos), use_cache=False).logits[0]
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits[0]
        leaky = model(input_ids=torch.from_numpy(ids), use_cache=False).logits[0]  # no position reset
    assert torch.allclose(packed[:5], alone_a, atol=1e-5)
    assert torch.allclose(packed[5:8], alone_b, atol=1e-5)
    assert not torch.allclose(leaky[5:8], alone_b, atol=1e-3)  # the check can fail
