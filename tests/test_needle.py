"""ram/needle.py: RAM's close reading on real weights (S9) — segments, scores, the budget — and the needle task."""
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import data
from configurator import configure, settings_of
from model import ModelConfig, Transformer
from ram import needle
from ram.needle import read, scores, spans
from ram.ram import close_read
from ram import tasks
from ram.tasks import make_needle
from test_data import english_file
from test_gguf import smollm2_path

ROOT = Path(__file__).resolve().parents[1]
ENC = data.get_tokenizer("bytes")


def test_fixed_segments_are_every_segment_tokens_and_a_short_last_one():
    assert spans([False] * 70, 32) == [(0, 32), (32, 64), (64, 70)]


@pytest.mark.parametrize("seed", range(5))
def test_sentence_segments_cover_the_context_and_never_cut_a_sentence_that_fits(seed):
    rng = random.Random(seed)
    ends = [rng.random() < 0.08 for _ in range(500)]
    parts = spans(ends, 32)
    assert parts[0][0] == 0 and parts[-1][1] == 500 and all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
    assert all(0 < b - a <= 32 for a, b in parts)
    starts = [0] + [i + 1 for i, e in enumerate(ends) if e]
    for a, b in zip(starts, starts[1:] + [500]):  # every sentence of at most 32 tokens lies in one segment
        if b - a <= 32:
            assert any(x <= a and b <= y for x, y in parts), (a, b)


def test_close_reading_keeps_exactly_k_fixed_segments_the_best_scored_in_original_order():
    parts = spans([False] * 320, 32)  # 10 segments
    score = torch.tensor([0.1, 0.9, -0.3, 0.8, 0.2, 0.7, 0.0, -0.1, 0.3, 0.4])
    kept = close_read(score, parts, budget=3 * 32 + 31)  # room for 3 segments, not 4
    assert kept == [1, 3, 5]


def test_close_reading_fills_the_budget_with_whatever_fits_when_segments_differ():
    parts = [(0, 30), (30, 40), (40, 70), (70, 75)]
    kept = close_read(torch.tensor([0.9, 0.8, 0.7, 0.1]), parts, budget=45)  # 30 + 10, then 30 > 5 left, then 5
    assert kept == [0, 1, 3] and sum(parts[i][1] - parts[i][0] for i in kept) <= 45


def test_scores_equal_a_hand_computation_of_pooled_states_after_k_layers():
    """Each segment and the question alone through the first k blocks; mean over every position but the
    first (the attention sink); cosine."""
    torch.manual_seed(0)
    net = Transformer(ModelConfig(vocab_size=50, n_layer=3, n_head=2, n_kv_head=1, n_embd=16, chunk_size=0,
                                  block_size=64)).eval()
    context, question = torch.randint(50, (40,)), torch.randint(50, (7,))
    parts = [(0, 12), (12, 13), (13, 30), (30, 40)]  # unequal, one of a single token

    def hand(ids):
        h = net.tok_embeddings(ids[None])
        for block in net.layers[:2]:
            h, _ = block(h, net.rope_at(range(len(ids))))
        return h[0, 1:].mean(0) if len(ids) > 1 else h[0, 0]

    want = torch.stack([F.cosine_similarity(hand(context[a:b]), hand(question), dim=0) for a, b in parts])
    torch.testing.assert_close(scores(net, context, parts, question, n_layers=2, rows_per_pass=3), want,
                               rtol=0, atol=1e-5)


def tiny_net():
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=256, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, chunk_size=0,
                                   block_size=256)).eval()


def test_truncation_reads_the_last_quarter_and_ram_reads_kept_segments_in_order_within_it():
    context = torch.tensor(list(b"One. Two two. Three three three.\n" * 6))  # (198,)
    question = torch.tensor(list(b"Two?"))
    cfg = dict(method="truncate", keep_ratio=0.25, split="sentences", segment=24, encoder_layers=1)
    ids, kept = read(tiny_net(), ENC, context, question, cfg, {})
    assert kept is None and ids.tolist() == context[-49:].tolist()  # floor(0.25 * 198)
    ids, kept = read(tiny_net(), ENC, context, question, {**cfg, "method": "ram"}, {})
    assert kept == sorted(kept) and sum(b - a for a, b in kept) <= 49 and len(kept) >= 2
    assert ids.tolist() == sum((context[a:b].tolist() for a, b in kept), [])
    assert all(bytes(context[a:b].tolist()).endswith((b". ", b".\n", b".")) for a, b in kept)  # whole sentences


def test_a_budget_smaller_than_every_segment_is_one_clear_error():
    cfg = dict(method="ram", keep_ratio=0.01, split="fixed", segment=16, encoder_layers=1)
    with pytest.raises(ValueError, match="fewer than any segment holds: raise keep_ratio or lower segment=16"):
        read(tiny_net(), ENC, torch.arange(100), torch.arange(5), cfg, {})


@pytest.mark.parametrize("depth", [0.0, 0.13, 0.97, 1.0])
def test_the_needle_is_a_line_of_its_own_at_its_depth_and_the_question_completes_it(tmp_path, depth):
    held = data.filler_tokens(ENC, english_file(tmp_path), "heldout")
    s = make_needle(ENC, 1500, depth, random.Random(3), filler=held)
    fact = bytes(s.sentence.tolist()).decode()
    color, thing, code = fact.removeprefix("\nThe secret code of the ").removesuffix(".\n").replace(" is", "").split()
    assert color in tasks.COLORS and thing in tasks.THINGS and len(code) == 5
    assert (s.tokens(*s.evidence) == s.sentence).all() and len(s.tokens()) == 1500
    assert (s.tokens()[-len(s.question) - len(s.answer):] == list(s.question) + list(s.answer)).all()
    assert s.insert == round(depth * (s.n_context - len(s.sentence)))
    assert bytes(s.question.tolist()).decode() == f"\nThe secret code of the {color} {thing} is"
    assert bytes(s.answer.tolist()).decode() == " " + code


@pytest.mark.parametrize("args, message", [
    (["--method=rag"], "method='rag' must be one of full, ram, truncate"),
    (["--split=words"], "split='words' must be one of sentences, fixed"),
    (["--keep_ratio=0"], "keep_ratio=0.0 must be in (0, 1]"),
    (["--model="], "give --model=PATH"),
    (["--depths=0.5,1.2"], "lengths must be positive, depths in [0, 1]"),
    (["--lengths=2048,x"], "--lengths=2048,x: expected comma-separated ints"),
])
def test_bad_needle_settings_are_one_clear_line(args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        needle.check(configure(settings_of(vars(needle)), ["--model=x.gguf", *args]))


@pytest.mark.slow
def test_ram_on_the_real_smollm2_reads_a_quarter_and_keeps_the_fact(tmp_path):
    """The real GGUF, one question at 1,024 tokens: RAM's kept segments hold the fact."""
    out = tmp_path / "ram.json"
    r = subprocess.run([sys.executable, "-m", "ram.needle", f"--model={smollm2_path()}", f"--filler={english_file(tmp_path)}",
                        "--lengths=1024", "--depths=0.3", "--trials=1", "--threads=1", f"--json={out}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["trials"] == 1 and cell["fact_kept"] == 1.0 and cell["length"] == 1024
