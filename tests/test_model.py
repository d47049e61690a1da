"""Invariants of the decoder and of CoMeT's chunked forward (S2), streaming (S6) and gradients (BPTT)."""
import math

import pytest
import torch

from baselines import sliding_window_attention
from conftest import plan_logits, tiny_config, tiny_model
from model import Transformer, chunk_layout, chunk_spans
from stream import generate, new_stream, read_first_chunk, stream


def tokens(n, batch=2, seed=1, vocab=32):
    torch.manual_seed(seed)
    return torch.randint(vocab, (batch, n))


# --- S2: layout -------------------------------------------------------------------------------------

def test_closed_chunk_layout_puts_a_compression_token_after_every_stride_tokens_then_readouts():
    lay = chunk_layout(10, 4, 2, True, torch.device("cpu"))
    # rows: t0 t1 t2 t3 C t4 t5 t6 t7 C t8 t9 C R R  (ceil(10/4) = 3 compression tokens, last after t9)
    assert lay.tokens.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11]
    assert lay.compression.tolist() == [4, 9, 12]
    assert lay.readout.tolist() == [13, 14]
    assert lay.length == 15


def test_open_chunk_layout_has_no_readout_and_no_trailing_compression_token():
    lay = chunk_layout(8, 4, 2, False, torch.device("cpu"))
    assert lay.compression.tolist() == [4] and lay.readout.numel() == 0 and lay.length == 9


def test_open_chunk_rows_are_a_prefix_of_a_longer_open_chunks_rows(model):
    idx = tokens(8)
    longest = model.embed_chunk(idx, model.layout(8, closed=False))
    for n in range(8):
        rows = model.embed_chunk(idx[:, :n], model.layout(n, closed=False))
        assert torch.equal(rows, longest[:, :rows.size(1)])


def test_layout_orders_token_compression_and_readout_embeddings_into_place(model):
    lay = model.layout(8, closed=True)
    idx = tokens(8)
    h = model.embed_chunk(idx, lay)
    assert torch.equal(h[:, lay.tokens], model.tok_embeddings(idx))
    assert torch.equal(h[:, lay.compression], model.compression_emb.expand(2, 2, -1))
    assert torch.equal(h[:, lay.readout], model.readout_emb.expand(2, -1, -1))


def test_a_sink_row_goes_first_and_shifts_every_other_row_by_one():
    plain, sunk = (chunk_layout(10, 4, 2, True, torch.device("cpu"), 5, n_sink) for n_sink in (0, 1))
    assert sunk.order[0] == 0 and sunk.length == plain.length + 1
    for rows in ("tokens", "compression", "readout"):
        assert torch.equal(getattr(sunk, rows), getattr(plain, rows) + 1)
    # S2: the sink at position 0, then the prefix [G; T] (5 rows) at 1..5, the chunk's rows after it
    assert sunk.positions == range(1, 5 + plain.length + 1) and plain.positions == range(0, 5 + plain.length)


def test_the_sink_row_is_the_sink_token_alone_at_position_0_in_every_chunk():
    # its keys and values are those of a plain decoder reading the sink token as its first token, whatever
    # the memories hold: the real tokens keep the sink a pretrained model attends to
    model = tiny_model(sink_token=5)
    alone = model.run_blocks(model.tok_embeddings(torch.tensor([[5, 5]])))[1]  # (k, v) per layer, positions 0, 1
    memory, seen = model.empty_memory(2), 0
    for span in chunk_spans(27, 8):
        x = tokens(27)[:, span.start:span.stop]
        lay = model.layout(x.size(1), x.size(1) == 8, memory[0].prefix_len)
        h, new = model.embed_chunk(x, lay), []
        for l, mem in enumerate(memory):
            h, kv, mem = model.layer_step(l, h, mem, lay)
            for cached, ref in zip(kv, alone[l]):
                torch.testing.assert_close(cached[:, :, :1], ref[:, :, :1].expand(2, -1, -1, -1), rtol=0, atol=1e-6)
            new.append(mem)
            seen += 1
        memory = tuple(new)
    assert seen == 4 * model.config.n_layer and memory[0].prefix_len > 0


@pytest.mark.parametrize("n_chunks", [1, 2.5])
def test_streaming_with_a_sink_row_gives_the_full_forward_logits(n_chunks):
    model = tiny_model(sink_token=0)
    n = int(n_chunks * 8)
    idx = tokens(n)
    full, _ = model(idx)
    logits, state = stream(model, idx[:, :3], new_stream(model, 2))  # an open chunk's first rows: sink included
    torch.testing.assert_close(logits, full[:, 2], rtol=0, atol=1e-5)
    for p in range(3, n):  # one token at a time through the cache, across chunk borders
        logits, state = stream(model, idx[:, p:p + 1], state)
        torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)


# --- equivalences -----------------------------------------------------------------------------------

def test_comet_without_memories_equals_the_plain_decoder_within_one_chunk():
    comet = tiny_model(n_global=0, temp_budget=0)
    plain = Transformer(tiny_config(chunk_size=0)).eval()
    plain.load_state_dict(comet.state_dict())  # identical parameter sets: no memory modules at all
    idx = tokens(8)
    assert (comet(idx)[0] - plain(idx)[0]).abs().max() <= 1e-6


def test_gqa_equals_multi_head_attention_with_shared_key_value_heads():
    gqa = tiny_model(n_kv_head=2)
    mha = Transformer(tiny_config(n_kv_head=4)).eval()
    sd = gqa.state_dict()
    for name in list(sd):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):  # (2*hs, C) -> (4*hs, C)
            sd[name] = sd[name].view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(sd)
    idx = tokens(20)
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_chunks", [1, 2.5, 7])
def test_streaming_prefill_and_decoding_give_the_full_forward_logits(model, n_chunks):
    n = int(n_chunks * model.config.chunk_size)
    idx = tokens(n)
    full, _ = model(idx)
    n_prompt = max(1, n - 11)  # decode the last 11 tokens one by one: crosses a chunk border
    logits, state = stream(model, idx[:, :n_prompt], new_stream(model, 2))
    assert (logits - full[:, n_prompt - 1]).abs().max() <= 1e-5
    for p in range(n_prompt, n):
        logits, state = stream(model, idx[:, p:p + 1], state)
        assert (logits - full[:, p]).abs().max() <= 1e-5, f"position {p}"


def test_streaming_in_uneven_pieces_gives_the_same_logits_and_memories(model):
    idx = tokens(43)
    full, _ = model(idx)
    _, whole = stream(model, idx, new_stream(model, 2))
    state = new_stream(model, 2)
    for a, b in [(0, 3), (3, 13), (13, 14), (14, 40), (40, 43)]:
        logits, state = stream(model, idx[:, a:b], state)
        torch.testing.assert_close(logits, full[:, b - 1], rtol=0, atol=1e-5)
    assert torch.equal(state.tokens, whole.tokens)
    for m1, m2 in zip(whole.memory, state.memory):
        for t1, t2 in zip(m1.tensors(), m2.tensors()):
            torch.testing.assert_close(t1, t2, rtol=0, atol=1e-5)


def test_greedy_generation_follows_the_full_forward_argmax(model):
    prompt = tokens(13, batch=1)
    new, _ = generate(model, prompt, 12, temperature=0)
    seq = torch.cat([prompt, new], 1)
    full, _ = model(seq)
    assert torch.equal(full[0, 12:-1].argmax(-1), new[0])


def test_plain_decoder_streams_with_a_kv_cache():
    model = tiny_model(chunk_size=0, block_size=40)
    idx = tokens(30)
    full, _ = model(idx)
    logits, state = stream(model, idx[:, :20], new_stream(model, 2))
    for p in range(20, 30):
        logits, state = stream(model, idx[:, p:p + 1], state)
        torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)


# --- chunk plans: where chunks start ------------------------------------------------------------------

@pytest.mark.parametrize("align", ["left", "right"])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 23, 24, 25])
def test_chunk_plan_cuts_the_sequence_into_consecutive_chunks_of_at_most_chunk_size(n, align):
    spans = chunk_spans(n, 8, align)
    assert [i for s in spans for i in s] == list(range(n))
    sizes = [len(s) for s in spans]
    assert all(0 < k <= 8 for k in sizes) and len(spans) == math.ceil(n / 8)
    inner = sizes[:-1] if align == "left" else sizes[1:]  # only the first (right) or last (left) may be short
    assert all(k == 8 for k in inner)


def test_right_aligned_plan_is_the_left_one_when_the_length_is_a_multiple_of_the_chunk(model):
    assert torch.equal(model(tokens(24), align="right")[0], model(tokens(24))[0])
    assert not torch.allclose(model(tokens(21), align="right")[0], model(tokens(21))[0])  # else it does nothing


def test_right_aligned_forward_equals_streaming_a_closed_short_first_chunk_then_the_rest(model):
    idx = tokens(21)  # chunks of 5, 8, 8 tokens
    full, _ = model(idx, align="right")
    state, head = read_first_chunk(model, idx, 21, "right")
    assert head == 5
    for p in range(head, 21):
        logits, state = stream(model, idx[:, p:p + 1], state)
        torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)
    assert state.tokens.size(1) == 0  # the plan's last chunk ends at the last token: closed


def test_greedy_generation_after_a_right_aligned_prompt_follows_the_right_aligned_forward_argmax(model):
    prompt, n_new = tokens(13, batch=1), 6  # 18 tokens read in all: chunks of 2, 8, 8; the answer is not cut
    state, head = read_first_chunk(model, prompt[:, :-1], 13 + n_new - 1, "right")
    _, state = stream(model, prompt[:, head:-1], state)
    new, _ = generate(model, prompt[:, -1:], n_new, temperature=0, state=state)
    full, _ = model(torch.cat([prompt, new], 1)[:, :-1], align="right")
    assert head == 2 and torch.equal(full[0, 12:].argmax(-1), new[0])


def test_a_plan_that_starts_with_a_full_chunk_reads_nothing_ahead(model):
    for n_inputs, align in [(21, "left"), (24, "right"), (6, "right")]:  # a full first chunk; one open chunk
        state, head = read_first_chunk(model, tokens(21), n_inputs, align)
        assert head == 0 and state.tokens.size(1) == 0 and state.memory[0].prefix_len == 0


@pytest.mark.parametrize("n_read", [11, 13, 14])  # 3, 5 or 6 tokens open: the short chunk takes 2 prompt tokens, is
# the open tokens, or ends inside them (the last one then opens the next chunk)
def test_a_prompt_asked_right_aligned_from_a_state_reads_as_the_plan_that_ends_it_with_a_chunk(model, n_read):
    idx = tokens(21)  # a context read from its first token to n_read, then 21 - n_read inputs still to come
    _, state = stream(model, idx[:, :n_read], new_stream(model, 2))
    state, head = read_first_chunk(model, idx[:, n_read:], 21 - n_read, "right", state)
    assert head == {11: 2, 13: 0, 14: 0}[n_read]
    full = plan_logits(model, idx, [range(0, 8), range(8, 13), range(13, 21)])  # the short chunk 8-13 ends 13 before
    for p in range(n_read + head, 21):
        logits, state = stream(model, idx[:, p:p + 1], state)
        torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)
    assert state.tokens.size(1) == 0  # the last input ends a chunk


def test_a_state_whose_open_tokens_already_end_the_plan_with_a_chunk_is_left_as_it_is(model):
    _, state = stream(model, tokens(11), new_stream(model, 2))  # 3 open + 5 to come: one full chunk
    after, head = read_first_chunk(model, tokens(5), 5, "right", state)
    assert head == 0 and after is state


def test_an_unknown_chunk_plan_raises_one_clear_error(model):
    with pytest.raises(ValueError, match="chunk align='middle' must be one of left, right"):
        model(tokens(9), align="middle")


# --- causality and gradients ------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0, 3, 4, 7, 8, 12, 23, 30])  # chunk borders at 8, 16, 24; stride 4
def test_changing_tokens_after_p_never_changes_logits_up_to_p(model, p):
    idx = tokens(32)
    changed = idx.clone()
    changed[:, p + 1:] = (changed[:, p + 1:] + 1) % 32
    a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :p + 1], b[:, :p + 1])
    assert not torch.allclose(a[:, p + 1:], b[:, p + 1:])  # and the change is seen after p


def first_chunk_embedding_grad(model, n_chunks=4, **kw):
    """d(loss on the last chunk)/d(input embeddings of the first chunk)."""
    model.train()
    embeddings = []

    def keep(module, inputs, output):
        output.retain_grad()
        embeddings.append(output)

    hook = model.tok_embeddings.register_forward_hook(keep)
    idx = tokens(n_chunks * 8)
    logits, _ = model(idx, **kw)
    hook.remove()
    logits[:, -8:].logsumexp(-1).sum().backward()
    return embeddings[0].grad


def test_gradient_reaches_the_first_chunk_through_the_memories(model):
    assert first_chunk_embedding_grad(model).abs().sum() > 0


def test_gradient_to_the_first_chunk_is_exactly_zero_without_memories():
    assert torch.count_nonzero(first_chunk_embedding_grad(tiny_model(n_global=0, temp_budget=0))) == 0


@pytest.mark.parametrize("memory", [dict(), dict(n_global=0), dict(temp_budget=0)])
def test_gradient_is_exactly_zero_across_a_bptt_truncation_boundary(memory):
    model = tiny_model(**memory)
    assert first_chunk_embedding_grad(model, bptt_chunks=2).abs().sum() == 0  # boundary before chunk 3
    assert first_chunk_embedding_grad(model, bptt_chunks=4).abs().sum() > 0   # no boundary crossed


@pytest.mark.parametrize("first", [0, 3])  # 3: a right-aligned plan's short first chunk (1 compression token)
@pytest.mark.parametrize("memory", [dict(), dict(n_global=0), dict(temp_budget=0), dict(temp_budget=12)])
def test_memory_slots_predict_the_memory_shapes_after_every_chunk(memory, first):
    model = tiny_model(**memory)
    state = model.empty_memory(2)
    for n_closed in range(7):  # the FIFO fills, then stays at its budget
        for mem in state:
            want = model.config.memory_slots(n_closed, first)
            assert (mem.global_memory.size(1), mem.temp_memory.size(1)) == want
            assert mem.gate_state.shape == mem.global_memory.shape
        _, state = model.forward_chunk(tokens(first if first and not n_closed else 8), state)


@pytest.mark.parametrize("bptt, sink", [(0, -1), (2, -1), (2, 0)])
def test_checkpointed_activations_give_the_same_loss_and_gradients(bptt, sink):
    """Each layer-over-chunk step recomputed in backward (non-reentrant checkpoint): the same step, ≤ 1e-6."""
    def step(checkpointed):
        model = tiny_model(sink_token=sink).train()
        model.checkpoint_activations = checkpointed
        idx = tokens(44)  # 5 full chunks and an open one
        _, loss = model(idx[:, :-1], idx[:, 1:], bptt_chunks=bptt)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    (loss, grads), (loss_ck, grads_ck) = step(False), step(True)
    assert loss_ck == loss
    for name, g in grads.items():
        assert (grads_ck[name] - g).abs().max() <= 1e-6 * max(1.0, g.abs().max().item()), name


def test_checkpointing_keeps_no_activations_of_a_layer_step_for_backward():
    """With checkpointing, autograd keeps none of a step's own tensors: backward recomputes them."""
    model = tiny_model().train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(tokens(16))
    kept = sum(saved)
    model.checkpoint_activations, saved[:] = True, []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        model(tokens(16))
    assert sum(saved) < kept / 3  # what remains: the embedding's and the output's saves


def test_truncated_bptt_does_not_change_the_forward(model):
    idx = tokens(40)
    assert torch.equal(model(idx)[0], model(idx, bptt_chunks=2)[0])


def test_loss_is_cross_entropy_over_real_tokens_and_skips_minus_one(model):
    idx = tokens(20)
    targets = tokens(20, seed=2)
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 20, 32)  # one row per real token: no memory/compression/readout rows
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 32), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


# --- positions --------------------------------------------------------------------------------------

def test_rope_table_is_never_longer_than_one_extended_chunk(model):
    cfg = model.config
    extended = cfg.n_global + cfg.temp_budget + cfg.chunk_size + math.ceil(cfg.chunk_size / cfg.stride) + cfg.n_global
    model(tokens(50 * cfg.chunk_size + 3))
    stream(model, tokens(30 * cfg.chunk_size + 5), new_stream(model, 2))
    assert model.rope_cos.shape == model.rope_sin.shape == (extended, cfg.head_dim)


@pytest.mark.parametrize("sink, expected", [(-1, [0, 5, 6, 6]), (0, [0, 1, 0, 6, 0, 7, 0, 7])])
def test_chunk_rows_start_right_after_the_memory_prefix_of_that_chunk(monkeypatch, sink, expected):
    # S2: position j of the extended chunk is j. The prefix [G; T] takes positions 0..n-1, so
    # the chunk's first row sits at n = n_global + current FIFO length: 0, 3+2, 3+3, 3+3 (2 slots/chunk, budget 3).
    # With a sink row: each chunk's attention runs twice, the sink alone at 0, then the rest from 1 (the first
    # chunk has no memory: its first token sits at 1), then 1 + 5, 1 + 6, 1 + 6.
    model = tiny_model(sink_token=sink)
    attention, starts = model.layers[0].attention, []
    forward = attention.forward

    def recording(x, rope, past=None, n_prefix=0):  # the RoPE position of the call's first query row
        starts.append(int((model.rope_cos == rope[0][n_prefix]).all(-1).nonzero()[0]))
        return forward(x, rope, past, n_prefix)

    monkeypatch.setattr(attention, "forward", recording)
    model(tokens(4 * 8))
    assert starts == expected


# --- config errors -----------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (dict(n_layer=0), "n_layer=0 must be positive"),
    (dict(n_embd=-8), "n_embd=-8 must be positive"),
    (dict(chunk_size=-1), "chunk_size=-1"),
    (dict(n_global=-1), "n_global=-1"),
    (dict(temp_budget=-2), "temp_budget=-2"),
    (dict(stride=0), "stride=0 must be positive"),
    (dict(stride=16), "stride=16 must be <= chunk_size=8"),
    (dict(n_head=5), "n_head=5 must divide n_embd=32"),
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_embd=24, n_head=8, n_kv_head=8), "must be even for RoPE"),
    (dict(window=-1), "window=-1"),
    (dict(window=4), "window=4 is a plain-decoder baseline: it needs chunk_size=0"),
    (dict(sink_token=32), "sink_token=32 must be a token id below vocab_size=32 or -1"),
    (dict(sink_token=-2), "sink_token=-2 must be a token id"),
    (dict(chunk_size=0, sink_token=0), "sink_token=0 is a row in front of CoMeT's chunks: it needs chunk_size > 0"),
])
def test_bad_sizes_raise_one_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**bad)


def test_optional_fields_accept_none_or_their_type_and_derive_defaults():
    cfg = tiny_config(init_std=0.05, n_kv_head=None, ffn_hidden=None)
    assert (cfg.init_std, cfg.n_kv_head, cfg.ffn_hidden) == (0.05, 4, 96)
    assert tiny_config(init_std=1).init_std == 1  # an int is fine for a float
    assert tiny_config() == tiny_config(**{k: v for k, v in vars(tiny_config()).items()})  # round trip


@pytest.mark.parametrize("bad", [dict(n_layer="4"), dict(chunk_size=8.0), dict(tie_embeddings=1),
                                 dict(n_head=True), dict(init_std="0.02"), dict(n_kv_head=2.0)])
def test_wrong_types_raise_type_error(bad):
    with pytest.raises(TypeError, match=f"{next(iter(bad))} must be"):
        tiny_config(**bad)


def test_plain_decoder_rejects_a_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="longer than block_size=16"):
        tiny_model(chunk_size=0, block_size=16)(tokens(17))


# --- the sliding-window baseline (a plain decoder whose tokens see only the last `window` positions) -------

def band_attention(q, k, v, window):
    """Reference: dense attention with the explicit (T, S) band mask."""
    T, S = q.size(2), k.size(2)
    p, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(j <= p) & (j > p - window))


@pytest.mark.parametrize("T,S", [(600, 600), (300, 700), (1, 50)])  # whole sequence, after a cache, decoding
def test_blockwise_sliding_window_attention_equals_the_dense_band_mask(T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, T, 8), torch.randn(1, 2, S, 8), torch.randn(1, 2, S, 8)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 48, block=256), band_attention(q, k, v, 48))


def test_sliding_window_decoder_never_sees_tokens_beyond_its_window():
    # One layer sees window-1 tokens back, so with 2 layers logit p depends on tokens p-2(window-1)..p only.
    model = tiny_model(chunk_size=0, window=5)
    idx = tokens(40)
    changed = idx.clone()
    changed[:, 10] = (idx[:, 10] + 1) % 32
    a, b = model(idx)[0], model(changed)[0]
    reach = 10 + 2 * (5 - 1)  # the last position token 10 can reach
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=0)  # causal
    assert (a[:, reach] - b[:, reach]).abs().max() > 1e-4  # inside the window: it does matter
    torch.testing.assert_close(a[:, reach + 1:], b[:, reach + 1:], rtol=0, atol=1e-6)  # beyond: never


def test_sliding_window_wider_than_the_sequence_is_full_attention():
    full = tiny_model(chunk_size=0)
    wide = tiny_model(chunk_size=0, window=64)
    idx = tokens(40)
    torch.testing.assert_close(wide(idx)[0], full(idx)[0], rtol=0, atol=1e-6)


def test_sliding_window_decoder_streams_with_its_cache_like_the_full_forward():
    model = tiny_model(chunk_size=0, window=6, block_size=64)
    idx = tokens(50)
    full, _ = model(idx)
    logits, state = stream(model, idx[:, :30], new_stream(model, 2))
    torch.testing.assert_close(logits, full[:, 29], rtol=0, atol=1e-5)
    for p in range(30, 50):
        logits, state = stream(model, idx[:, p:p + 1], state)
        torch.testing.assert_close(logits, full[:, p], rtol=0, atol=1e-5)
