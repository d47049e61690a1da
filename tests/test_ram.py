"""RAM (S9, ram.py): independent segment encoding, close reading, skimming, the InfoNCE loss, and its
place in train.py / eval_passkey.py."""
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval_passkey
import stream as streaming
from checkpoint import load_model
from data import get_tokenizer, make_facts, sample_batch
from eval_passkey import passkey_cell
from model import ModelConfig
from ram import (RAM, RAMConfig, budget, info_nce, load_ram, n_keep, positives, reading_order, segments, select,
                 skim_weights)

ROOT = Path(__file__).resolve().parents[1]
ENC = get_tokenizer("bytes")


def tiny_ram(seed: int = 0, **ram) -> RAM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, chunk_size=0, block_size=256)
    return RAM(cfg, RAMConfig(**{"segment": 6, **ram}), verbose=False).eval()


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
        RAM(ModelConfig(vocab_size=40, chunk_size=8), RAMConfig(), verbose=False)


# --- train.py and eval_passkey.py --------------------------------------------------------------------

def run(*args, ok=True):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, (r.stdout + r.stderr)[-2000:]
    return r.stdout + r.stderr


SMOKE_RAM = ["config/smoke.py", "--method=ram", "--chunk_size=0", "--segment=20", "--min_len=200",
             "--max_len=220", "--max_iters=4", "--eval_interval=0"]


@pytest.mark.parametrize("task", ["passkey", "facts"])
def test_train_ram_checkpoint_then_evaluate_with_method_ram(tmp_path, task):
    run("train.py", *SMOKE_RAM, f"--task={task}", f"--out_dir={tmp_path}")
    model, ckpt = load_ram(str(tmp_path / "ckpt.pt"))
    assert isinstance(model, RAM) and ckpt["ram_args"]["segment"] == 20 and ckpt["config"]["task"] == task
    out = run("eval_passkey.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--method=ram", "--lengths=220",
              "--depths=0,1", "--trials=2", "--keep_ratio=0.125")
    assert f"{task} task, method ram, keep_ratio 0.125" in out and "accuracy (%)" in out


ALONE = ["--chunk_size=0", "--method=ram", "--ram_query=alone", "--encoder_layers=1"]


@pytest.mark.parametrize("method", [[], ["--chunk_size=0"], ["--chunk_size=0", "--method=truncate"],
                                    ["--chunk_size=0", "--method=ram"], ALONE],
                         ids=["comet", "full", "truncate", "ram", "ram_alone"])
def test_every_method_trains_a_step_on_the_recall_task_and_records_it(tmp_path, method):
    run("train.py", "config/smoke.py", "--task=recall", "--segment=20", "--min_len=200", "--max_len=220",
        "--max_iters=1", "--eval_interval=0", *method, f"--out_dir={tmp_path}")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["task"] == "recall" and ckpt["iter_num"] == 1
    if "--method=ram" in method:
        alone = len(method) > 2
        assert ckpt["ram_args"]["query"] == ckpt["config"]["ram_query"] == ("alone" if alone else "front")
        assert ckpt["ram_args"]["encoder_layers"] == ckpt["config"]["encoder_layers"] == (1 if alone else 0)


def test_ram_training_losses_are_deterministic_and_resume_refuses_other_ram_settings(tmp_path):
    run("train.py", *SMOKE_RAM, f"--out_dir={tmp_path / 'a'}")
    run("train.py", *SMOKE_RAM, f"--out_dir={tmp_path / 'b'}")
    read = lambda d: (tmp_path / d / "log.jsonl").read_text()
    assert read("a") == read("b")
    err = run("train.py", *SMOKE_RAM, f"--out_dir={tmp_path / 'a'}", "--init_from=resume", "--keep_ratio=0.5",
              "--max_iters=6", ok=False)
    assert "keep_ratio cannot change when resuming" in err


def test_truncate_baseline_trains_and_reads_only_the_budget(tmp_path, monkeypatch):
    run("train.py", "config/smoke.py", "--method=truncate", "--chunk_size=0", "--task=facts", "--min_len=300",
        "--max_len=300", "--max_iters=2", "--eval_interval=0", f"--out_dir={tmp_path}")
    model, _ = load_model(str(tmp_path / "ckpt.pt"))
    seen = []
    def counting(m, idx, state, f=streaming.stream):
        seen.append(idx.size(1))
        return f(m, idx, state)

    monkeypatch.setattr(streaming, "stream", counting)  # the calls inside generate
    monkeypatch.setattr(eval_passkey, "stream", counting)  # and eval_passkey's own, for long prompts
    passkey_cell(model, ENC, 300, 0.5, 1, 0, task="facts", method="truncate", ram=RAMConfig(keep_ratio=0.25))
    s = sample_batch(ENC, 1, 300, 0, task="facts")[0]
    n = s.n_context
    assert seen[0] == budget(n, RAMConfig()) + len(s.question)  # then one token per generated step


@pytest.mark.parametrize("args, message", [
    (["--method=ram"], "method=ram reads with a plain decoder: set chunk_size=0"),
    (["--method=ram", "--chunk_size=0", "--keep_ratio=2"], "keep_ratio=2"),
    (["--method=rag", "--chunk_size=0"], "method='rag' must be comet, ram or truncate"),
    (["--task=trivia"], "task='trivia' must be one of passkey, facts, recall, needle\n"),
])
def test_bad_ram_training_settings_are_one_clear_error(tmp_path, args, message):
    err = run("train.py", "config/smoke.py", f"--out_dir={tmp_path}", *args, ok=False)
    assert message in err and "Traceback" not in err


def test_eval_says_which_block_size_a_long_ram_input_needs(tmp_path):
    run("train.py", *SMOKE_RAM, "--max_iters=1", f"--out_dir={tmp_path}")
    err = run("eval_passkey.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--lengths=9000", "--trials=1", ok=False)
    assert "more than its block_size=1,024; --block_size=" in err and "Traceback" not in err


def test_eval_method_must_match_the_checkpoint(tmp_path):
    run("train.py", "config/smoke.py", "--max_iters=1", "--eval_interval=0", f"--out_dir={tmp_path}")
    err = run("eval_passkey.py", f"--ckpt={tmp_path / 'ckpt.pt'}", "--method=ram", "--lengths=200", ok=False)
    assert "method=ram needs a RAM checkpoint" in err and "Traceback" not in err
