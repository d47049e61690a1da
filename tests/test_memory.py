"""Invariants of the global memory (S3), the temporary memory (S4) and their state container."""

import pytest
import torch

from conftest import tiny_config, tiny_model
from memory import GlobalMemory, LowRankAdapter, MemoryState, TemporaryMemory, memory_param_count
from model import ModelConfig, Transformer
from stream import new_stream, stream


def stream_chunks(model, n_chunks, seed=1):
    """The stream state after the first n_chunks of one fixed random sequence."""
    cfg = model.config
    torch.manual_seed(seed)
    idx = torch.randint(cfg.vocab_size, (2, 100 * cfg.chunk_size))
    _, state = stream(model, idx[:, :n_chunks * cfg.chunk_size], new_stream(model, 2))
    return state


def test_memory_size_is_the_same_after_2_10_and_100_chunks(model):
    cfg = model.config
    shapes = []
    for n in (2, 10, 100):
        state = stream_chunks(model, n)
        assert state.tokens.size(1) == 0 and state.cache == ()  # nothing of the chunks is kept but memory
        for mem in state.memory:
            assert mem.gate_state.shape == mem.global_memory.shape == (2, cfg.n_global, cfg.n_embd)
            assert mem.temp_memory.size(1) <= cfg.temp_budget
        shapes.append([[t.shape for t in mem.tensors()] for mem in state.memory])
    assert shapes[0] == shapes[1] == shapes[2]


def test_fifo_fills_by_compression_tokens_per_chunk_up_to_budget():
    model = tiny_model(temp_budget=5)  # 2 compression tokens per chunk: 2, 4, 5, 5
    assert [stream_chunks(model, n).memory[0].temp_memory.size(1) for n in (1, 2, 3, 4)] == [2, 4, 5, 5]


def test_the_gate_is_one_scalar_per_slot_from_the_second_chunk_on():
    torch.manual_seed(0)
    mem = GlobalMemory(32, rank=4, eps=1e-5)
    state, _, gate = mem(torch.randn(4, 6, 32), torch.zeros(4, 0, 32))
    assert gate is None  # first chunk: nothing to keep, no gate
    state, _, gate = mem(torch.randn(4, 6, 32), state)
    assert gate.shape == (4, 6, 1)


def test_first_chunk_takes_the_normalised_readout_without_gate():
    torch.manual_seed(0)
    mem = GlobalMemory(32, rank=4, eps=1e-5)
    readout = torch.randn(2, 6, 32)
    state, memory, _ = mem(readout, torch.zeros(2, 0, 32))
    torch.testing.assert_close(state, mem.norm(readout))
    torch.testing.assert_close(memory, mem.adapter(state))


def test_gated_update_follows_s3_written_out():
    torch.manual_seed(0)
    mem = GlobalMemory(32, rank=4, eps=1e-5)
    old, readout = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    candidate = readout * torch.rsqrt(readout.pow(2).mean(-1, keepdim=True) + 1e-5) * mem.norm.weight
    gate = torch.sigmoid(torch.cat([old, candidate], -1) @ mem.gate.weight.T)  # W_g [s_{t-1}; s~]
    state, memory, got_gate = mem(readout, old)
    torch.testing.assert_close(got_gate, gate)
    torch.testing.assert_close(state, gate * old + (1 - gate) * candidate)
    torch.testing.assert_close(memory, state + mem.adapter.up(mem.adapter.down(state)))


def test_without_the_gate_each_chunk_overwrites_the_global_memory():
    torch.manual_seed(0)
    mem = GlobalMemory(32, rank=4, eps=1e-5, gated=False)
    assert mem.gate is None  # no W_g parameter
    state, _, _ = mem(torch.randn(2, 6, 32), torch.zeros(2, 0, 32))
    readout = torch.randn(2, 6, 32)
    state, memory, gate = mem(readout, state)
    assert gate is None
    torch.testing.assert_close(state, mem.norm(readout))  # the old state is gone: s_t = s~_t (RMT-like)
    torch.testing.assert_close(memory, mem.adapter(state))


class SaturatedGate(torch.nn.Module):
    """Stands in for W_g: logit 50 -> sigmoid is exactly 1.0 in fp32."""

    def forward(self, x):
        return x.new_full((*x.shape[:-1], 1), 50.0)


def test_gate_forced_to_1_keeps_the_state_of_the_first_chunk_forever(model):
    for layer_memory in model.memories:
        layer_memory.global_mem.gate = SaturatedGate()
    first = stream_chunks(model, 1)
    later = stream_chunks(model, 7)
    for a, b in zip(first.memory, later.memory):
        assert torch.equal(a.gate_state, b.gate_state)
        assert torch.equal(a.global_memory, b.global_memory)
    assert not torch.equal(first.memory[0].temp_memory, later.memory[0].temp_memory)  # the FIFO moved on


def test_fifo_keeps_exactly_the_newest_budget_slots_in_order():
    torch.manual_seed(0)
    fifo_mem = TemporaryMemory(16, budget=5, rank=4, eps=1e-5)
    torch.nn.init.normal_(fifo_mem.adapter.up.weight)
    chunks = [torch.randn(1, 2, 16) for _ in range(6)]  # 2 slots per chunk, 12 in all
    fifo = torch.zeros(1, 0, 16)
    for c in chunks:
        fifo = fifo_mem(c, fifo)
    all_slots = torch.cat([fifo_mem.adapter(fifo_mem.norm(c)) for c in chunks], 1)
    assert fifo.shape == (1, 5, 16)
    torch.testing.assert_close(fifo, all_slots[:, -5:])  # newest 5, oldest first


def test_adapters_start_as_the_identity():
    model = Transformer(tiny_config())
    x = torch.randn(3, 32)
    for module in model.modules():
        if isinstance(module, LowRankAdapter):
            assert torch.equal(module(x), x)


def test_memory_state_unpacks_what_it_packed(model):
    state = stream_chunks(model, 3).memory[1]
    received = MemoryState.unpack(state.pack(), n_global=3)
    assert all(torch.equal(a, b) for a, b in zip(state.tensors(), received.tensors()))
    empty = MemoryState.empty(2, 32)
    assert all(t.shape == (2, 0, 32) for t in MemoryState.unpack(empty.pack(), 0).tensors())


def test_memory_state_detach_and_to_return_new_states():
    s = torch.randn(1, 3, 8, requires_grad=True)
    state = MemoryState(s, 2 * s, s[:, :1] * 3)
    detached = state.detach()
    assert all(t.requires_grad for t in state.tensors())
    assert not any(t.requires_grad for t in detached.tensors())
    assert all(t.dtype == torch.float64 for t in state.to(torch.float64).tensors())


@pytest.mark.parametrize("n_global,temp_budget,gated", [(3, 3, True), (3, 0, True), (0, 3, True), (0, 0, True),
                                                       (3, 3, False)])
def test_memory_parameter_count_matches_the_formula_of_s5(n_global, temp_budget, gated):
    model = Transformer(tiny_config(n_global=n_global, temp_budget=temp_budget, global_gate=gated))
    _, counted = model.param_counts()
    assert counted == memory_param_count(2, 32, n_global, temp_budget, 4, gated)


def test_memory_parameter_count_of_the_default_model():
    # d 128, 4 layers, rank 8 -> 18,432 in the memory modules (36 d per layer, S5), as the CoMeT authors' code
    # counts them, plus the compression token and 16 readout tokens.
    cfg = ModelConfig(n_embd=128, n_layer=4, n_global=16, temp_budget=32)
    assert memory_param_count(4, 128, 16, 32, 8) == 18_432 + 17 * 128
    assert Transformer(cfg).param_counts()[1] == 18_432 + 17 * 128


@pytest.mark.parametrize("bias", [0.0, 3.0])
def test_a_gate_bias_starts_the_gate_at_its_sigmoid_and_adds_one_parameter_per_layer(bias):
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, chunk_size=16, n_global=4, stride=4, temp_budget=8,
                      gate_bias=bias)
    model = Transformer(cfg)
    assert model.param_counts()[1] == memory_param_count(2, 32, 4, 8, cfg.adapter_rank, True, bias)
    gate = model.memories[0].global_mem
    torch.manual_seed(0)
    state, readout = torch.randn(256, 4, 32), torch.randn(256, 4, 32)
    g = gate(readout, state)[2]  # (B, n_global, 1)
    assert abs(g.mean().item() - torch.sigmoid(torch.tensor(bias)).item()) < 0.05  # 0.5 without a bias, 0.95 at 3
    assert (gate.gate.bias is None) if not bias else gate.gate.bias.item() == bias
