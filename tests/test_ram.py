"""RAM (S9, ram/): independent segment encoding, close reading, skimming, the InfoNCE loss; its tasks; and its
entry points, which hand train.py's loop and eval_passkey.py's grid their batches, loss and reading."""
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval_passkey
import stream as streaming
import train
from conftest import tiny_model
from data import FILLER, get_tokenizer, sample_batch
from model import ModelConfig
from ram import eval_ram, tasks, train_ram
from ram.ram import (RAM, RAMConfig, budget, info_nce, load_ram, n_keep, positives, reading_order, segments, select,
                     skim_weights)
from ram.tasks import make_facts, make_recall

ROOT = Path(__file__).resolve().parents[1]
ENC = get_tokenizer("bytes")


def tiny_ram(seed: int = 0, **ram) -> RAM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, chunk_size=0, block_size=256)
    return RAM(cfg, RAMConfig(**{"segment": 6, **ram})).eval()


def batch(seed: int = 0, B: int = 2, Q: int = 5, N: int = 40, A: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(40, (B, Q), generator=g), torch.randint(40, (B, N), generator=g),
            torch.randint(40, (B, A), generator=g))


# --- S9.2: parallel, query-conditioned encoding -----------------------------------------------------

def test_changing_segment_j_does_not_change_segment_i():
    model = tiny_ram()
    query, context, _ = batch()
    _, rep, states, _ = model.encode(query, context)
    changed = context.clone()
    changed[:, 12:18] = (changed[:, 12:18] + 1) % 40  # segment 2 of 7 (segment length 6)
    _, rep2, states2, _ = model.encode(query, changed)
    others = [i for i in range(rep.size(1)) if i != 2]
    torch.testing.assert_close(states2[:, others], states[:, others], rtol=0, atol=1e-6)
    torch.testing.assert_close(rep2[:, others], rep[:, others], rtol=0, atol=1e-6)
    assert (rep2[:, 2] - rep[:, 2]).abs().max() > 1e-3


def test_encoding_equals_the_query_in_front_of_each_segment_run_alone():
    """The query's keys/values are computed once and shared, which must equal running [query; segment]."""
    model = tiny_ram()
    query, context, _ = batch(N=36)
    q_rep, _, states, _ = model.encode(query, context, rows_per_pass=5)  # rows in several passes too
    tokens, _ = segments(context, 6)
    for s in range(tokens.size(1)):
        h, _ = model.hidden(model.encoder, model.encoder.tok_embeddings(torch.cat([query, tokens[:, s]], 1)))
        torch.testing.assert_close(states[:, s], h[:, query.size(1):], rtol=0, atol=1e-5)
        torch.testing.assert_close(q_rep, h[:, :query.size(1)].mean(1), rtol=0, atol=1e-5)


def test_alone_mode_encodes_the_query_and_each_segment_as_rows_of_their_own_through_k_layers():
    """The authors' code: no query in front; the states after the first encoder_layers blocks, unnormed.
    Checked against the blocks run by hand (positions from 0 in every row)."""
    model = tiny_ram(query="alone", encoder_layers=1)
    query, context, _ = batch(N=36)
    q_rep, seg_rep, states, _ = model.encode(query, context, rows_per_pass=5)
    net = model.encoder

    def first_block(ids):
        h, _ = net.layers[0](net.tok_embeddings(ids), net.rope_at(range(ids.size(1))))
        return h

    torch.testing.assert_close(q_rep, first_block(query).mean(1), rtol=0, atol=1e-5)
    tokens, _ = segments(context, 6)
    for s in range(tokens.size(1)):
        torch.testing.assert_close(states[:, s], first_block(tokens[:, s]), rtol=0, atol=1e-5)
        torch.testing.assert_close(seg_rep[:, s], states[:, s].mean(1), rtol=0, atol=1e-6)


def test_front_mode_with_k_encoder_layers_equals_query_and_segment_through_k_blocks_by_hand():
    model = tiny_ram(encoder_layers=1)
    query, context, _ = batch(N=36)
    q_rep, _, states, _ = model.encode(query, context, rows_per_pass=5)
    net, Q = model.encoder, query.size(1)
    tokens, _ = segments(context, 6)
    for s in range(tokens.size(1)):
        ids = torch.cat([query, tokens[:, s]], 1)
        h, _ = net.layers[0](net.tok_embeddings(ids), net.rope_at(range(ids.size(1))))
        torch.testing.assert_close(states[:, s], h[:, Q:], rtol=0, atol=1e-5)
        torch.testing.assert_close(q_rep, h[:, :Q].mean(1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("query", ["front", "alone"])
def test_encoder_layers_equal_to_the_depth_is_the_whole_encoder(query):
    query_ids, context, _ = batch(N=36)
    whole = tiny_ram(query=query).encode(query_ids, context)
    as_many = tiny_ram(query=query, encoder_layers=2).encode(query_ids, context)
    for a, b in zip(whole, as_many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ram, message", [(dict(query="middle"), "query='middle' must be one of front, alone"),
                                          (dict(encoder_layers=-1), "encoder_layers=-1 must be >= 0"),
                                          (dict(encoder_layers=3), "encoder_layers=3 exceeds the model's n_layer=2")])
def test_bad_query_mode_or_encoder_depth_is_one_clear_error(ram, message):
    with pytest.raises(ValueError, match=message):
        tiny_ram(**ram)


def test_segment_representation_is_the_mean_over_its_real_tokens_only():
    model = tiny_ram()
    query, context, _ = batch(N=40)  # the last segment holds 4 tokens and 2 pads
    _, rep, states, mask = model.encode(query, context)
    assert mask[:, -1].sum(-1).tolist() == [4, 4]
    torch.testing.assert_close(rep[:, -1], states[:, -1, :4].mean(1))


# --- S9.3-5: close reading, skimming, the decoder's reading order ------------------------------------

def test_top_k_keeps_exactly_k_segments_in_original_order():
    scores = torch.tensor([[0.1, 0.9, -0.3, 0.8, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1]])
    keep = select(scores, 2)
    assert keep.sum(1).tolist() == [2, 2]
    assert keep[0].tolist() == [False, True, False, True, False] and keep[1].tolist() == [True, True, False, False, False]
    order = reading_order(keep[0], n_tokens=13, segment=3)  # segments 0-3 of 3 tokens, segment 4 of 1
    # skim of segment 0 (row 13 + 0), tokens of 1, skim of 2, tokens of 3, skim of 4
    assert order.tolist() == [13, 3, 4, 5, 15, 9, 10, 11, 17]


def test_decoder_reads_kept_tokens_and_skim_vectors_in_original_order_then_the_query():
    model = tiny_ram(keep_ratio=0.3)
    query, context, _ = batch(N=30)  # 5 segments, k = floor(0.3 * 30 / 6) = 1
    rows, ids, _, _, keep = model.compress(query, context)
    for b in range(2):
        kept = int(keep[b].nonzero())
        emb = model.decoder.tok_embeddings(context[b])
        assert len(rows[b]) == 6 + 4 == budget(30, model.ram)
        where = kept  # a kept segment takes 6 rows where its one skim row would be
        torch.testing.assert_close(rows[b][where:where + 6], emb[6 * kept:6 * kept + 6])
        assert ids[b][where:where + 6].tolist() == context[b, 6 * kept:6 * kept + 6].tolist()
        assert (ids[b] == -1).sum() == 4


def test_close_reading_keeps_the_segments_most_similar_to_the_query():
    model = tiny_ram(keep_ratio=0.4)
    query, context, _ = batch(N=36)  # 6 segments, k = 2
    _, _, q_rep, seg_rep, keep = model.compress(query, context)
    cos = F.cosine_similarity(seg_rep, q_rep[:, None], dim=-1)
    assert torch.equal(keep, select(cos, 2))
    assert (cos[keep].view(2, 2).min(1).values >= cos.masked_fill(keep, 2).min(1).values).all()


def test_keep_ratio_at_evaluation_changes_how_much_is_read_closely():
    model = tiny_ram(keep_ratio=0.5)
    query, context, _ = batch(N=48)  # 8 segments: k = 4 as trained, 1 at keep_ratio 0.125
    for ratio, k in ((None, 4), (0.125, 1)):
        rows, _, _, _, keep = model.compress(query, context, ratio)
        assert keep.sum(1).tolist() == [k, k] and len(rows[0]) == k * 6 + 8 - k


def test_skim_weights_sum_to_one_over_real_tokens():
    torch.manual_seed(0)
    states, q = torch.randn(2, 3, 5, 8), torch.randn(2, 8)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, 2, 3:] = False  # a partial last segment
    w = skim_weights(states, mask, q)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert (w[:, 2, 3:] == 0).all() and (w > 0)[mask].all()
    # the most query-like token gets the most weight
    cos = F.cosine_similarity(states, q[:, None, None], dim=-1)
    assert torch.equal(w[:, :2].argmax(-1), cos[:, :2].argmax(-1))


def test_a_skim_vector_is_the_aligned_query_weighted_sum_of_its_token_states():
    model = tiny_ram(keep_ratio=0.3)
    query, context, _ = batch(N=30)
    rows, _, q_rep, _, keep = model.compress(query, context)
    _, _, states, mask = model.encode(query, context)
    w = skim_weights(states, mask, q_rep)
    b, kept = 0, int(keep[0].nonzero())
    skimmed = [s for s in range(5) if s != kept]
    where = [s if s < kept else s + 5 for s in skimmed]  # row of each skim: the kept segment takes 6 rows
    expected = model.align((w[b, skimmed, :, None] * states[b, skimmed]).sum(1))
    torch.testing.assert_close(rows[b][where], expected)


def test_n_keep_and_budget_follow_keep_ratio():
    assert n_keep(470, 50, 0.25) == 2 and n_keep(470, 50, 0.125) == 1 and n_keep(20, 50, 0.25) == 1
    assert n_keep(100, 50, 1.0) == 2
    assert budget(470, RAMConfig()) == 2 * 50 + 8  # 10 segments: 2 kept, 8 skimmed
    assert budget(30, RAMConfig()) == 30  # never more than the context itself


# --- S9.6: the loss ---------------------------------------------------------------------------------

def unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)])


def test_info_nce_equals_a_hand_computed_value_on_three_segments():
    q = unit(0.0)[None]
    cosines = [0.2, 0.5, -0.1]  # the positives (0 and 2) are not the closest: a loss of about 6
    segs = torch.stack([unit(math.acos(c)) * r for c, r in zip(cosines, (1.0, 3.0, 0.5))])[None]  # lengths don't matter
    pos = torch.tensor([[True, False, True]])
    t = 0.05
    e = [math.exp(c / t) for c in cosines]
    expected = -math.log((e[0] + e[2]) / sum(e))
    assert info_nce(q, segs, pos, t).item() == pytest.approx(expected, rel=1e-5)
    only_first = -math.log(e[0] / sum(e))
    assert info_nce(q, segs, torch.tensor([[True, False, False]]), t).item() == pytest.approx(only_first, rel=1e-5)


def test_samples_without_a_positive_are_skipped():
    torch.manual_seed(0)
    q, segs = torch.randn(3, 8), torch.randn(3, 4, 8)
    pos = torch.tensor([[True, False, False, False], [False] * 4, [False, False, True, True]])
    both = info_nce(q, segs, pos, 0.05)
    kept = info_nce(q[[0, 2]], segs[[0, 2]], pos[[0, 2]], 0.05)
    torch.testing.assert_close(both, kept)
    none = info_nce(q.requires_grad_(), segs, torch.zeros(3, 4, dtype=torch.bool), 0.05)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(q.grad).all()


def test_positives_are_the_segments_overlapping_the_answer_sentence():
    pos = positives([(0, 3), (48, 53), (100, 101), (40, 50)], n_tokens=120, segment=50)  # spans end exclusive
    assert pos.tolist() == [[True, False, False], [True, True, False], [False, False, True], [True, False, False]]


def test_a_facts_sample_marks_the_asked_fact_as_evidence():
    s = make_facts(ENC, 600, 0.4, random.Random(0))
    text = ENC.decode(s.tokens().tolist())
    fact = ENC.decode(s.tokens(*s.evidence).tolist())
    name = ENC.decode(s.question.tolist()).removeprefix("What is ").split("'s")[0]
    assert fact == f"{name}'s code is{ENC.decode(s.answer.tolist())}. "
    assert text.count("'s code is ") == 4 + 1  # four facts, then the question
    assert text.endswith(f"{name}'s code is{ENC.decode(s.answer.tolist())}")


def test_loss_combines_answer_nll_lm_and_contrast_with_lambda():
    model = tiny_ram(contrast_weight=0.5)
    query, context, answer = batch(N=30)
    pos = positives([(0, 4), (20, 25)], 30, 6)
    loss, parts = model.loss(query, context, answer, pos, lm_weight=0.1)
    torch.testing.assert_close(loss, parts["answer"] + 0.1 * parts["lm"] + 0.5 * parts["contrast"])
    torch.testing.assert_close(parts["contrast"], info_nce(*model.encode(query, context)[:2], pos, 0.05))


def uneven_batch(model):
    """A batch whose two rows give the decoder different lengths (one keeps the short last segment)."""
    for seed in range(100):
        query, context, answer = batch(seed, N=41)
        if len({len(r) for r in model.compress(query, context)[0]}) == 2:
            return query, context, answer
    raise AssertionError("no batch with uneven rows")


def loss_by_hand(model):
    """RAM's loss parts on a batch of uneven rows, and per row the logits of a plain forward over
    [context rows; query; answer[:-1]] with the token id behind every position (-1: skim vector)."""
    query, context, answer = uneven_batch(model)  # the right padding of the shorter row must not matter
    _, parts = model.loss(query, context, answer, positives([(0, 1)] * 2, 41, 6))
    rows, ids, _, _, _ = model.compress(query, context)
    per_row = []
    for b in range(2):
        x = torch.cat([rows[b], model.decoder.tok_embeddings(torch.cat([query[b], answer[b, :-1]]))])[None]
        h, _ = model.hidden(model.decoder, x)
        per_row.append((model.decoder.output(h[0]), torch.cat([ids[b], query[b], answer[b]]), answer[b]))
    return parts, per_row


def test_answer_nll_is_the_cross_entropy_of_each_answer_token_after_the_query():
    parts, per_row = loss_by_hand(tiny_ram(keep_ratio=0.5))
    nll = [F.cross_entropy(logits[-3:], answer, reduction="none") for logits, _, answer in per_row]
    torch.testing.assert_close(parts["answer"], torch.cat(nll).mean())


def test_lm_term_is_the_next_token_nll_of_the_tokens_the_decoder_reads_except_the_answer():
    parts, per_row = loss_by_hand(tiny_ram(keep_ratio=0.5))
    nll = []
    for logits, seq, answer in per_row:
        targets = seq[1:len(seq) - len(answer)]  # every next token up to the last query token's
        real = targets >= 0  # a skim vector is no token to predict
        nll.append(F.cross_entropy(logits[:len(targets)][real], targets[real], reduction="none"))
    torch.testing.assert_close(parts["lm"], torch.cat(nll).mean())


def test_greedy_answer_with_kv_cache_equals_the_teacher_forced_forward():
    model = tiny_ram(keep_ratio=0.5)
    query, context, _ = uneven_batch(model)  # decoded in two groups of equal length
    out = model.answer(query, context, 4)
    # feed the answer it gave: the loss on it is the argmax path, so each answer token is the argmax
    rows, _, _, _, _ = model.compress(query, context)
    for b in range(2):
        x = torch.cat([rows[b], model.decoder.tok_embeddings(torch.cat([query[b], out[b, :-1]]))])[None]
        h, _ = model.hidden(model.decoder, x)
        assert model.decoder.output(h[0, -4:]).argmax(-1).tolist() == out[b].tolist()


def test_shared_weights_have_one_transformer_and_unshared_two():
    shared, unshared = tiny_ram(), tiny_ram(shared=False)
    assert shared.encoder is shared.decoder and not any(k.startswith("own_encoder") for k in shared.state_dict())
    assert unshared.encoder is not unshared.decoder
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(unshared) == n(shared) + n(shared.decoder)


@pytest.mark.parametrize("bad, message", [
    (dict(keep_ratio=0.0), "keep_ratio=0.0 must lie in"), (dict(keep_ratio=1.5), "keep_ratio=1.5 must lie in"),
    (dict(segment=0), "segment=0 must be > 0"), (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(contrast_weight=-1.0), "contrast_weight=-1.0 must be >= 0")])
def test_bad_ram_settings_are_one_clear_value_error(bad, message):
    with pytest.raises(ValueError, match=f"^RAMConfig: {message}"):
        RAMConfig(**bad)


def test_a_ram_setting_of_the_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="RAMConfig: segment must be int, got 50.0"):
        RAMConfig(segment=50.0)


def test_ram_needs_a_plain_decoder():
    with pytest.raises(ValueError, match="chunk_size=0"):
        RAM(ModelConfig(vocab_size=40, chunk_size=8), RAMConfig())


# --- its tasks (ram/tasks.py) ----------------------------------------------------------------------------

def decode(ids) -> str:
    return ENC.decode([int(i) for i in ids])

@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_facts_task_hides_distinct_facts_and_asks_one_at_the_requested_depth(depth):
    s = make_facts(ENC, 800, depth, random.Random(5), n_facts=4)
    text = decode(s.tokens())
    facts = [decode(f) for f in s.sentences]
    assert len(set(f.split("'s")[0] for f in facts)) == 4 and len(set(f.split(" is ")[1] for f in facts)) == 4
    assert all(text[i:i + len(f)] == f for i, f in zip(s.inserts, facts))
    n_filler = s.n_context - sum(map(len, s.sentences))
    filler_before = s.insert - sum(len(f) for f in s.sentences[:s.target])
    assert filler_before == round(depth * n_filler)
    name, key = facts[s.target].split("'s code is ")
    assert decode(s.question) == tasks.FACT_QUESTION.format(name=name) and decode(s.answer) == " " + key[:-2]


@pytest.mark.parametrize("depth", [0.0, 0.13, 0.5, 0.97, 1.0])
def test_recall_task_hides_one_token_keys_and_asks_one_at_the_requested_depth(depth):
    s = make_recall(ENC, 1024, depth, random.Random(7))
    text, facts = decode(s.tokens()), [decode(f) for f in s.sentences]
    keys, values = zip(*((f[0], f[1:-2]) for f in facts))  # "K48213. " -> "K", "48213"
    assert len(facts) == 8 and len(set(keys)) == 8 and len(set(values)) == 8
    assert all(len(ENC.encode(k)) == 1 and k in tasks.RECALL_KEYS and k not in FILLER for k in keys)
    assert all(text[i:i + len(f)] == f for i, f in zip(s.inserts, facts))
    n_filler = s.n_context - sum(map(len, s.sentences))
    assert s.insert - sum(len(f) for f in s.sentences[:s.target]) == round(depth * n_filler)
    key, value = keys[s.target], values[s.target]
    assert all(f == f"{k}{v}. " and v.isdigit() and len(v) == 5 for f, k, v in zip(facts, keys, values))
    assert decode(s.question) == f"Which code starts with {key}? {key}" and decode(s.answer) == value
    assert text.endswith(decode(s.question) + decode(s.answer)) and len(s.tokens()) == 1024
    assert (s.tokens(*s.evidence) == s.sentence).all()


def test_facts_lazy_slices_equal_the_whole_sequence():
    s = make_facts(ENC, 700, 0.3, random.Random(6), n_facts=6)
    whole = s.tokens()
    assert len(whole) == 700
    for a, b in [(0, 700), (100, 350), (699, 700)] + [(i - 1, i + 2) for i in s.inserts]:
        assert np.array_equal(s.tokens(a, b), whole[a:b])




# --- its entry points: python -m ram.train_ram, python -m ram.eval_ram --------------------------------------

def run(*args, ok=True):
    r = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, (r.stdout + r.stderr)[-2000:]
    return r.stdout + r.stderr


SMOKE_RAM = ["config/smoke.py", "--method=ram", "--chunk_size=0", "--segment=20", "--min_len=200", "--max_len=220",
             "--max_iters=4", "--eval_interval=0"]


@pytest.fixture(scope="module")
def trained_ram(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ram")
    run("ram.train_ram", *SMOKE_RAM, "--task=facts", f"--out_dir={out}")
    return out


def test_rams_entry_points_train_it_and_evaluate_it(trained_ram):
    model, ckpt = load_ram(str(trained_ram / "ckpt.pt"))
    assert isinstance(model, RAM) and ckpt["ram_args"]["segment"] == 20 and ckpt["config"]["task"] == "facts"
    out = run("ram.eval_ram", f"--ckpt={trained_ram / 'ckpt.pt'}", "--lengths=220", "--depths=0,1", "--trials=2",
              "--keep_ratio=0.125")
    assert "facts task, method ram, keep_ratio 0.125" in out and "accuracy (%)" in out


def test_a_ram_run_resumes_only_with_its_own_reading_settings(trained_ram):
    err = run("ram.train_ram", *SMOKE_RAM, "--task=facts", f"--out_dir={trained_ram}", "--init_from=resume",
              "--keep_ratio=0.5", "--max_iters=6", ok=False)
    assert "keep_ratio" in err and "cannot change" in err and "Traceback" not in err
    err = run("ram.eval_ram", f"--ckpt={trained_ram / 'ckpt.pt'}", "--method=comet", "--lengths=200", ok=False)
    assert "method=comet needs a CoMeT or plain decoder checkpoint" in err and "Traceback" not in err


def ram_settings(monkeypatch, **over) -> dict:
    config = {**train_ram.DEFAULTS, **dict(chunk_size=0, segment=20, min_len=200, max_len=220, batch_size=2, n_layer=1,
                                           n_embd=32, n_head=2, n_kv_head=2, ffn_hidden=64, eval_trials=5), **over}
    for k, v in config.items():
        monkeypatch.setattr(train, k, v, raising=False)
    return config


def one_step(config: dict) -> tuple[float, train.Recipe]:
    torch.manual_seed(0)
    r = train_ram.recipe(config, ENC, None, "cpu", None)
    record, _, _ = train.train_step(r.model, train.make_optimizer(r.model, False), r._replace(slices=1), None,
                                    torch.autocast("cpu", enabled=False), 0, [])
    return record["loss"], r


@pytest.mark.parametrize("method", [dict(method="comet", chunk_size=16), dict(method="comet"), dict(method="truncate"),
                                    dict(method="ram"), dict(method="ram", ram_query="alone", encoder_layers=1)],
                         ids=["comet", "full", "truncate", "ram", "ram_alone"])
def test_every_method_trains_a_step_on_the_recall_task_the_same_way_twice(monkeypatch, method):
    config = ram_settings(monkeypatch, task="recall", **method)
    loss, r = one_step(config)
    assert loss > 0 and one_step(config)[0] == loss
    if method["method"] == "ram":
        assert r.record["ram_args"]["query"] == method.get("ram_query", "front")
        assert r.record["ram_args"]["encoder_layers"] == method.get("encoder_layers", 0)
    assert 0 <= r.evaluate(r.model) <= 1


def test_the_truncated_baseline_reads_only_rams_budget_of_the_context(monkeypatch):
    seen = []
    real = streaming.stream

    def counting(m, idx, state):
        seen.append(idx.size(1))
        return real(m, idx, state)

    monkeypatch.setattr(streaming, "stream", counting)
    decoder = tiny_model(chunk_size=0, vocab_size=ENC.n_vocab, block_size=512)
    (s,) = sample_batch(ENC, 1, 300, 0, make=tasks.maker("facts"))
    eval_ram.truncate_cell(decoder, [s], RAMConfig(keep_ratio=0.25), [], piece=65536)
    assert sum(seen[:2]) == budget(s.n_context, RAMConfig()) + len(s.question)  # then one token per generated step


@pytest.mark.parametrize("bad, names", [(dict(method="ram", chunk_size=16), "set chunk_size=0"),
                                        (dict(method="ram", keep_ratio=2.0), "keep_ratio"),
                                        (dict(method="rag"), "method='rag'"), (dict(task="trivia"), "task='trivia'"),
                                        (dict(method="ram", pipeline=True), "in one process"),
                                        (dict(method="ram", ckpt_shards=True), "set ckpt_shards=False")])
def test_a_bad_ram_setting_is_one_clear_error_naming_it(bad, names):
    with pytest.raises(ValueError, match=re.escape(names)):
        train_ram.check_settings({**train_ram.DEFAULTS, "chunk_size": 0, **bad}, ENC)


def test_a_ram_input_longer_than_its_decoder_says_which_block_size_it_needs(monkeypatch):
    model = RAM(ModelConfig(vocab_size=ENC.n_vocab, n_layer=1, n_embd=32, n_head=2, chunk_size=0), RAMConfig())
    cfg = {**eval_ram.SETTINGS, "lengths": "9000", "trials": 1}
    rows = lambda n: budget(n, RAMConfig()) + 50
    with pytest.raises(ValueError, match="block_size=1,024; --block_size="):
        eval_passkey.prepare(cfg, (model, ENC, {}, "cpu"), tasks.maker("facts"), rows)


def test_block_size_lengthens_the_rope_of_every_decoder_ram_has():
    model = RAM(ModelConfig(vocab_size=ENC.n_vocab, n_layer=1, n_embd=32, n_head=2, chunk_size=0),
                RAMConfig(shared=False))
    eval_passkey.set_block_size(model, 4096)
    assert model.config.block_size == 4096
    assert [m.rope_cos.size(0) for m in (model.decoder, model.own_encoder)] == [4096, 4096]


def test_eval_ram_refuses_the_settings_only_passkeys_have(trained_ram):
    err = run("ram.eval_ram", f"--ckpt={trained_ram / 'ckpt.pt'}", "--state=out/x.state", "--lengths=220", ok=False)
    assert "--state, --asks and --perplexity are eval_passkey.py's" in err and "Traceback" not in err
