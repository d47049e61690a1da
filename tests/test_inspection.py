"""Inspection (inspection.py) reads the memories without touching the model's computation."""
import pytest
import torch

from conftest import tiny_model
from inspection import GROUPS, attention_weights, record
from memory import TemporaryMemory


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


@pytest.mark.parametrize("n_prefix,window", [(0, 0), (5, 0), (0, 3)])  # first chunk, after [G; T], windowed
def test_recorded_attention_weights_are_the_ones_the_layer_applies(n_prefix, window):
    model = tiny_model(chunk_size=0, window=window) if window else tiny_model()
    attn = model.layers[0].attention
    x = torch.randn(2, n_prefix + 7, 32)
    rope = model.rope_at(range(n_prefix + 7))
    w = attention_weights(attn, x, rope, None, n_prefix, window)  # (B, nh, 7, n_prefix + 7)
    _, _, v, _ = attn.project(x, rope, None, n_prefix)
    y = (w @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn.wo(y), attn(x, rope, None, n_prefix)[0], rtol=0, atol=1e-6)


def test_attention_shares_sum_to_one_and_the_first_chunk_sees_only_itself(model):
    ins = record(model, tokens(4 * 8))
    assert ins.share.shape == (2, 4, len(GROUPS))
    torch.testing.assert_close(ins.share.sum(-1), torch.ones(2, 4))
    assert (ins.share[:, 0, :2] == 0).all()  # no memories before the first chunk
    assert (ins.share[:, 1:, :2] > 0).all()  # later chunks do look at G and T


@pytest.mark.parametrize("sink", [-1, 0])
def test_attention_shares_are_exact_under_uniform_attention(sink):
    # with zero queries every row spreads its attention evenly over the keys it sees: share = keys / visible.
    # A sink row (row 0, S2) is one more key, counted with the chunk's own rows
    model = tiny_model(sink_token=sink)
    for block in model.layers:
        torch.nn.init.zeros_(block.attention.wq.weight)
    ins = record(model, tokens(3 * 8))
    rows = model.layout(8, closed=True).tokens.float()  # rows of the real tokens after [G; T] (and the sink's)
    for t, (n_g, n_t) in enumerate([(0, 0), (3, 2), (3, 3)]):  # chunk t sees G and T of t closed chunks
        visible = n_g + n_t + rows + 1
        expected = torch.stack([n_g / visible, n_t / visible, (rows + 1) / visible]).mean(1)
        torch.testing.assert_close(ins.share[:, t], expected.expand(2, 3))


class SlotGate(torch.nn.Module):
    """Stands in for W_g: logit = slot index - 1, so every slot has its own gate."""

    def forward(self, x):
        return torch.arange(x.size(1), dtype=x.dtype).sub(1).view(1, -1, 1).expand(x.size(0), -1, 1)


def test_recorded_gates_are_the_gates_the_global_memory_applied(model):
    for mem in model.memories:
        mem.global_mem.gate = SlotGate()
    ins = record(model, tokens(3 * 8 + 2))
    assert ins.gates.shape == (2, 4, 3)
    assert ins.gates[:, 0].isnan().all() and ins.gates[:, 3].isnan().all()  # first chunk, open last chunk
    torch.testing.assert_close(ins.gates[:, 1:3], torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0])).expand(2, 2, 3))


def test_without_the_gate_nothing_is_recorded_as_a_gate():
    ins = record(tiny_model(global_gate=False), tokens(3 * 8))
    assert ins.gates.isnan().all()


def test_fifo_sources_follow_the_queue():
    # 2 compression tokens per chunk, 3 slots: chunk t sees the newest 3 of the 2t written so far
    ins = record(tiny_model(), tokens(5 * 8))
    assert ins.fifo == (((), (0, 0), (0, 1, 1), (1, 2, 2), (2, 3, 3)),) * 2  # both layers


def test_fifo_sources_are_read_off_the_queue_not_assumed(monkeypatch):

    def keep_the_oldest(self, compressed, fifo):  # a broken FIFO: drops the new slots once full
        return torch.cat([fifo, self.adapter(self.norm(compressed))], 1)[:, :self.budget]
    monkeypatch.setattr(TemporaryMemory, "forward", keep_the_oldest)
    ins = record(tiny_model(), tokens(5 * 8))
    assert ins.fifo[0] == ((), (0, 0), (0, 0, 1), (0, 0, 1), (0, 0, 1))


def test_without_a_temporary_memory_every_chunk_sees_an_empty_fifo():
    assert record(tiny_model(temp_budget=0), tokens(3 * 8)).fifo == (((), (), ()),) * 2


def test_inspection_refuses_a_plain_decoder():
    with pytest.raises(ValueError, match="plain decoder"):
        record(tiny_model(chunk_size=0), tokens(8))
