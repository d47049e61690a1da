"""Inspection (inspection.py) reads the memories without touching the model's computation."""
import pytest
import torch

from conftest import tiny_model
from inspection import GROUPS, attention_weights, record


def tokens(n, seed=1):
    torch.manual_seed(seed)
    return torch.randint(32, (2, n))


def test_inspection_does_not_change_the_logits_and_leaves_no_hooks(model):
    idx = tokens(3 * 8 + 5)  # three closed chunks and an open one
    before, _ = model(idx)
    ins = record(model, idx)
    assert torch.equal(ins.logits, before)
    assert torch.equal(model(idx)[0], before)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("n_prefix", [0, 5])  # a first chunk, and one after its memory rows [G; T]
def test_recorded_attention_weights_are_the_ones_the_layer_applies(model, n_prefix):
    attn = model.layers[0].attention
    x = torch.randn(2, n_prefix + 7, 32)
    w = attention_weights(attn, x, model.rope, None, n_prefix)  # (B, nh, 7, n_prefix + 7)
    _, _, v, _ = attn.project(x, model.rope, None, n_prefix)
    y = (w @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn.wo(y), attn(x, model.rope, None, n_prefix)[0], rtol=0, atol=1e-6)


def test_attention_shares_sum_to_one_and_the_first_chunk_sees_only_itself(model):
    ins = record(model, tokens(4 * 8))
    assert ins.share.shape == (2, 4, len(GROUPS))
    torch.testing.assert_close(ins.share.sum(-1), torch.ones(2, 4))
    assert (ins.share[:, 0, :2] == 0).all()  # no memories before the first chunk
    assert (ins.share[:, 1:, :2] > 0).all()  # later chunks do look at G and T


def test_recorded_gates_are_the_gates_the_global_memory_applied(model):
    for mem in model.memories:
        torch.nn.init.zeros_(mem.global_mem.gate.weight)  # logit 0 everywhere: every gate is exactly 0.5
    ins = record(model, tokens(3 * 8 + 2))
    assert ins.gates.shape == (2, 4, 3)
    assert ins.gates[:, 0].isnan().all() and ins.gates[:, 3].isnan().all()  # first chunk, open last chunk
    assert (ins.gates[:, 1:3] == 0.5).all()


def test_without_the_gate_nothing_is_recorded_as_a_gate():
    ins = record(tiny_model(global_gate=False), tokens(3 * 8))
    assert ins.gates.isnan().all()


def test_fifo_sources_follow_the_queue():
    # 2 compression tokens per chunk, 3 slots: chunk t sees the newest 3 of the 2t written so far
    ins = record(tiny_model(), tokens(5 * 8))
    assert ins.fifo == ((), (0, 0), (0, 1, 1), (1, 2, 2), (2, 3, 3))


def test_inspection_refuses_a_plain_decoder():
    with pytest.raises(ValueError, match="plain decoder"):
        record(tiny_model(chunk_size=0), tokens(8))
