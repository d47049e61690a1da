"""train.py end to end on a tiny config: deterministic losses, exact resume after SIGKILL, eval and sample."""
import json
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import data
import eval_passkey
import train
from checkpoint import load_model
from conftest import tiny_model
from data import get_tokenizer, make_sample
from eval_passkey import passkey_cell
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["config/smoke.py"]
ENC = get_tokenizer("bytes")


def train_cmd(out_dir, *extra):
    return [sys.executable, "train.py", *TINY, f"--out_dir={out_dir}", *extra]


def run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def fail(cmd, timeout=300) -> str:
    """Run a command that must fail; return its stderr."""
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 0, r.stdout[-2000:]
    return r.stderr


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [(r["iter"], r["loss"]) for r in map(json.loads, f)]


def test_same_seed_and_config_give_identical_losses_for_20_steps(tmp_path):
    run(train_cmd(tmp_path / "a", "--max_iters=20", "--eval_interval=0"))
    run(train_cmd(tmp_path / "b", "--max_iters=20", "--eval_interval=0"))
    a = losses(tmp_path / "a")
    assert len(a) == 20 and a == losses(tmp_path / "b")
    run(train_cmd(tmp_path / "c", "--max_iters=20", "--eval_interval=0", "--seed=7"))
    assert losses(tmp_path / "c") != a


def test_checkpointed_activations_train_with_the_same_losses(tmp_path):
    run(train_cmd(tmp_path / "a", "--max_iters=8", "--eval_interval=0"))
    run(train_cmd(tmp_path / "b", "--max_iters=8", "--eval_interval=0", "--checkpoint_activations"))
    (a, b) = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 8 and [i for i, _ in a] == [i for i, _ in b]
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-6)


def test_the_checkpoint_activations_setting_reaches_the_model():
    for on in (False, True):
        model = train.build_model({**train.DEFAULTS, "checkpoint_activations": on}, ENC, None, "cpu", verbose=False)
        assert model.checkpoint_activations is on


def test_a_frozen_base_under_bf16_is_held_in_bf16_and_never_changes(tmp_path):
    """--freeze_base with bf16 autocast: the base's matrices in bf16, bit for bit the same after 1 and 4
    steps; the memories, the norms and every optimizer state fp32, and the memories trained."""
    args = ["--freeze_base", "--dtype=bfloat16", "--eval_interval=0"]
    run(train_cmd(tmp_path / "one", "--max_iters=1", *args))
    run(train_cmd(tmp_path / "four", "--max_iters=4", *args))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "four"))
    memory = [n for n in a["model"] if tiny_model().is_memory_param(n)]
    assert memory and all(a["model"][n].dtype == torch.float32 for n in memory)
    assert any(not torch.equal(a["model"][n], b["model"][n]) for n in memory)
    for name, t in a["model"].items():
        if name not in memory:
            assert t.dtype == (torch.bfloat16 if t.dim() >= 2 else torch.float32), name
            assert torch.equal(t, b["model"][name]), name
    assert {s["exp_avg"].dtype for s in b["optimizer"]["state"].values()} == {torch.float32}
    model, _ = load_model(str(tmp_path / "four" / "ckpt.pt"))  # as sample.py and eval_passkey.py open it
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(torch.zeros(1, 20, dtype=torch.long))  # one dtype again: no bf16 matrix meets fp32 rows


def test_checkpointed_activations_need_comet(tmp_path):
    err = fail(train_cmd(tmp_path, "--chunk_size=0", "--checkpoint_activations"))
    assert "checkpoint_activations recomputes CoMeT's layer-over-chunk steps: it needs chunk_size > 0" in err


def test_a_run_killed_after_a_checkpoint_resumes_with_the_same_losses(tmp_path):
    args = ["--max_iters=60", "--ckpt_interval=10", "--eval_interval=25"]
    run(train_cmd(tmp_path / "whole", *args))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_logged = len(losses(killed))
    assert n_logged < 60, "the run finished before it could be killed"
    out = run(train_cmd(killed, *args, "--init_from=resume"))
    start = int(re.search(r"resuming from .* at iteration (\d+)", out).group(1))
    assert 10 <= start <= n_logged
    assert losses(killed) == losses(tmp_path / "whole")


def test_ctrl_c_finishes_the_step_and_leaves_a_checkpoint_of_every_logged_step(tmp_path):
    proc = subprocess.Popen(train_cmd(tmp_path, "--max_iters=100000", "--eval_interval=0", "--ckpt_interval=0"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "interrupted: checkpoint at iteration" in out, err[-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == len(log.read_text().splitlines()) >= 3


def test_resume_refuses_to_change_the_model_and_keeps_the_log_in_place(tmp_path):
    run(train_cmd(tmp_path / "a", "--max_iters=4", "--eval_interval=0"))
    os.rename(tmp_path / "a", tmp_path / "b")  # a checkpoint moved elsewhere resumes where it now is
    assert "n_embd cannot change when resuming" in fail(train_cmd(tmp_path / "b", "--init_from=resume", "--n_embd=64"))
    run(train_cmd(tmp_path / "b", "--init_from=resume", "--max_iters=6", "--eval_interval=0"))
    assert [i for i, _ in losses(tmp_path / "b")] == list(range(6)) and not (tmp_path / "a").exists()


@pytest.mark.parametrize("bad, message", [
    ("--device=gpu", "device='gpu' must be auto, cpu or cuda"),
    ("--dtype=float16", "dtype='float16' must be auto, float32 or bfloat16"),
    ("--curriculum=2.0", "curriculum=2.0 must lie in [0, 1]"),
    ("--edge_depths=-0.1", "edge_depths=-0.1 must lie in [0, 1]"),
    ("--batch_size=0", "batch_size=0 must be positive"),
    ("--batch_threads=0", "batch_threads=0 must be positive"),
    ("--tokenizer=/no/such.tiktoken", "no BPE file at /no/such.tiktoken"),
    ("--stride=64", "stride=64 must be <= chunk_size=16"),
    ("--pipeline_schedule=zigzag", "pipeline_schedule='zigzag' must be wavefront or naive"),
    ("--pipeline=True --chunk_size=0", "pipeline=True splits sequences by chunks: it needs chunk_size > 0"),
    ("--freeze_base=True --chunk_size=0", "freeze_base=True trains only the memories: it needs chunk_size > 0"),
    ("--ckpt_shards=True --method=ram", "ckpt_shards=True writes CoMeT's shards: it needs method=comet"),
    ("--chunk_align=middle", "chunk_align='middle' must be left, right or mixed"),
])
def test_bad_settings_stop_training_with_one_clear_line(tmp_path, bad, message):
    err = fail(train_cmd(tmp_path, *bad.split()))
    assert err.strip().startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_a_missing_filler_file_stops_training_with_one_clear_line(tmp_path):
    err = fail(train_cmd(tmp_path, f"--filler={tmp_path / 'essays.txt'}"))
    assert err.startswith("error: filler=") and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ckpt.pt").exists()


def test_held_out_perplexity_is_the_exp_of_the_mean_nll_of_each_windows_tail():
    model, ids = tiny_model(chunk_size=0), np.random.default_rng(0).integers(32, size=100)
    got = eval_passkey.held_out_perplexity(model, ids, 40, 8, 2)  # windows at tokens 0 and 60
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(model(torch.from_numpy(ids[a:a + 40])[None])[0][0, 31:39],
                                                 torch.from_numpy(ids[a + 32:a + 40])) for a in (0, 60)]
    assert got == pytest.approx(float(torch.exp((nll[0] + nll[1]) / 2)), rel=1e-6)
    with pytest.raises(ValueError, match="ppl_tail=40 < length=40"):
        eval_passkey.held_out_perplexity(model, ids, 40, 40, 1)


def test_shards_resume_exactly_when_some_parameters_have_no_adamw_state_yet(tmp_path):
    """Sequences of at most two chunks, the second open: the global memory's gate is never used, so AdamW
    holds no state for it; resumed from shards it still has none, and the losses are a run never stopped's."""
    args = ["--chunk_size=64", "--max_len=128", "--warmup=0", "--min_lr=1.0", "--curriculum=0", "--eval_interval=0"]
    run(train_cmd(tmp_path / "whole", "--max_iters=4", *args))
    run(train_cmd(tmp_path / "half", "--max_iters=2", "--ckpt_shards=True", *args))
    ckpt = torch.load(tmp_path / "whole" / "ckpt.pt", weights_only=True)
    assert len(ckpt["optimizer"]["state"]) < len(ckpt["model"]) - 1  # gates without state (output.weight: tied)
    run([sys.executable, "train.py", f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=4"])
    assert losses(tmp_path / "half") == losses(tmp_path / "whole")
    saved = checkpoint._saved_tensors(str(tmp_path / "half" / "ckpt-00000004.dcp"))
    assert "optimizer.memories.0.global_mem.gate.weight.step" not in saved  # none made up on loading
    assert "optimizer.memories.0.global_mem.adapter.up.weight.step" in saved


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_edge_depths_setting_decides_where_training_keys_sit(monkeypatch, share):
    depths = []
    make = data.make_sample
    monkeypatch.setattr(data, "make_sample", lambda task, enc, length, d, *a: depths.append(d) or make(task, enc,
                                                                                                    length, d, *a))
    monkeypatch.setattr(train, "edge_depths", share)
    train.get_samples(ENC, 5)
    assert len(depths) == train.batch_size and sum(d in (0.0, 1.0) for d in depths) == share * len(depths)


@pytest.mark.parametrize("key, then, now", [("edge_depths", 0.1, 0.3), ("chunk_align", "left", "right"),
                                            ("batch_threads", 1, 3)])
def test_a_checkpoint_from_before_a_setting_resumes_with_what_it_was_trained_with(monkeypatch, key, then, now):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    saved = {k: v for k, v in train.DEFAULTS.items() if k != key}
    ckpt = dict(optimizer={}, iter_num=3, config=saved, rng={})
    assert train.resume_settings(ckpt, "out")[key] == then != train.DEFAULTS[key]
    assert train.resume_settings({**ckpt, "config": {**saved, key: now}}, "out")[key] == now


@pytest.mark.parametrize("align", ["left", "right"])
def test_training_cuts_chunks_as_the_chunk_align_setting_says(monkeypatch, align):
    seen = []
    monkeypatch.setattr(train, "chunk_align", align)
    monkeypatch.setattr(Transformer, "forward_chunk", lambda self, idx, memory, closed: seen.append(
        (idx.size(1), closed)) or (torch.zeros(idx.size(0), idx.size(1), self.config.n_embd), memory))
    x = torch.zeros(2, 21, dtype=torch.long)
    train.lm_loss(tiny_model(), (x, x, x > 0, train.batch_align(0)), None)
    assert seen == ([(8, True), (8, True), (5, False)] if align == "left" else [(5, True), (8, True), (8, True)])


def test_mixed_chunk_plans_cut_half_the_iterations_right_aligned_the_same_way_every_run(monkeypatch):
    monkeypatch.setattr(train, "chunk_align", "mixed")
    plans = [train.batch_align(it) for it in range(2000)]
    assert set(plans) == {"left", "right"} and 900 < plans.count("right") < 1100
    assert plans[:8] == ["left"] * 5 + ["right", "left", "left"]  # a pure function of it: docs/passkey20.md's runs


@pytest.mark.parametrize("align", ["left", "right"])
def test_the_passkey_evaluations_greedy_answers_follow_the_forward_with_the_same_chunk_plan(monkeypatch, align):
    model, answers = tiny_model(vocab_size=ENC.n_vocab), []
    real = eval_passkey.generate
    monkeypatch.setattr(eval_passkey, "generate", lambda *a, **k: answers.append(real(*a, **k)[0]) or
                        (answers[-1], None))
    passkey_cell(model, ENC, 203, 0.5, 2, seed=5, align=align)
    rng = random.Random(5)
    samples = [make_sample("passkey", ENC, 203, 0.5, rng, 5) for _ in range(2)]
    prompt = torch.from_numpy(np.stack([s.tokens(0, 203 - 6) for s in samples]))
    (out,) = answers  # read back: the prompt and 5 of the 6 answer tokens, 202 in all
    logits, _ = model(torch.cat([prompt, out[:, :-1]], 1), align=align)
    assert torch.equal(logits[:, 203 - 6 - 1:].argmax(-1), out)


@pytest.mark.parametrize("align", ["left", "right"])
def test_the_passkey_evaluation_reads_a_short_first_chunk_only_when_right_aligned(monkeypatch, align):
    seen = []

    def oracle(model, idx, n_new, temperature, state):  # what generate() is given: the prompt's rest and the state
        seen.append((idx.size(1), state.memory[0].prefix_len))
        return idx[:, :n_new], state

    monkeypatch.setattr(eval_passkey, "generate", oracle)
    passkey_cell(tiny_model(vocab_size=ENC.n_vocab), ENC, 203, 0.5, 2, seed=5, align=align)
    n_prompt = 203 - 6  # " " and 5 digits; the model reads 202 tokens: 2 + 25 chunks of 8 when right-aligned
    # right: a chunk of 2 tokens was closed first: 3 global slots and 1 compression slot in front of what follows
    assert seen == ([(n_prompt, 0)] if align == "left" else [(n_prompt - 2, 3 + 1)])


@pytest.mark.parametrize("name", ["comet", "full_attention", "global_only", "no_gate", "temp_only", "sliding_window",
                                  "ram_passkey", "ram_facts", "truncate_facts"])
def test_configs_of_documented_runs_pin_the_recipe_they_were_trained_with(name):
    """Issue 20 changed the default recipe (edge_depths, max_len, max_iters, chunk_align, batch_threads); these
    configs' documented results came from the old one, so they reproduce only if each pins it."""
    pinned = runpy.run_path(str(ROOT / "config" / f"{name}.py"))
    assert pinned["edge_depths"] == 0.1 and pinned["max_len"] == 512
    assert pinned["chunk_align"] == "left" and pinned["batch_threads"] == 1
    assert pinned["max_iters"] == 1800 or name.startswith(("ram", "truncate"))  # RAM's runs set their own
    assert train.DEFAULTS["max_len"] != 512 and train.DEFAULTS["max_iters"] != 1800  # else this test proves nothing
    assert train.DEFAULTS["chunk_align"] != "left" and train.DEFAULTS["batch_threads"] != 1


def test_missing_or_damaged_shards_are_one_clear_error_on_resume(tmp_path):
    """--ckpt_shards in one process: ckpt.pt names its directory of shards; without it, or with a shard cut
    short, resuming (and sample.py) stops with one line and writes nothing."""
    run(train_cmd(tmp_path / "a", "--max_iters=2", "--eval_interval=0", "--ckpt_shards=True"))
    shards = tmp_path / "a" / "ckpt-00000002.dcp"
    (piece,) = shards.glob("*.distcp")
    piece.write_bytes(piece.read_bytes()[:1000])
    err = fail(train_cmd(tmp_path / "a", "--init_from=resume", "--max_iters=4"))
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: cannot resume: cannot load the shards in {shards} (corrupt or truncated?): rank 0")
    (shards / ".metadata").unlink()
    for cmd in (train_cmd(tmp_path / "a", "--init_from=resume", "--max_iters=4"),
                [sys.executable, "sample.py", f"--ckpt={tmp_path / 'a' / 'ckpt.pt'}", "--prompt=hi"]):
        err = fail(cmd)
        assert len(err.strip().splitlines()) == 1 and "keeps its weights in ckpt-00000002.dcp beside it, which is " \
            "missing or incomplete" in err, err
    assert len(losses(tmp_path / "a")) == 2


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    assert fail(train_cmd(tmp_path, "--init_from=resume")).strip().startswith("error: cannot resume: no checkpoint at")


def test_a_new_run_never_overwrites_an_existing_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    assert "exists: continue it with --init_from=resume" in fail(train_cmd(tmp_path, "--max_iters=2"))
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"


def test_too_short_min_len_is_one_clear_error(tmp_path):
    assert "too short for this task" in fail(train_cmd(tmp_path, "--min_len=50"))


@pytest.mark.slow
def test_eval_passkey_its_inspection_and_sample_run_on_a_trained_checkpoint(tmp_path):
    run(train_cmd(tmp_path, "--max_iters=5", "--eval_interval=0"))
    ckpt = str(tmp_path / "ckpt.pt")
    out = run([sys.executable, "eval_passkey.py", f"--ckpt={ckpt}", "--lengths", "150,1000", "--depths", "0,1",
               "--trials=3", "--piece=100", "--threads=1", f"--json={tmp_path / 'p.json'}"])
    assert "peak memory so far" in out and "length |" in out
    result = json.load(open(tmp_path / "p.json"))
    assert result["tok_s"].keys() == result["peak_memory_mib"].keys() == {"150", "1000"}  # per length
    cells = result["cells"]
    assert [(c["length"], c["depth"], c["trials"]) for c in cells] == [(150, 0, 3), (150, 1, 3), (1000, 0, 3),
                                                                        (1000, 1, 3)]
    assert result["chunk_align"] == "right"  # the default reading: each prompt and its answer end a chunk
    model, _ = load_model(ckpt)  # the grid reports what the model does: every cell recomputed in this process
    for k, (n, d) in enumerate([(150, 0), (150, 1), (1000, 0), (1000, 1)]):
        assert cells[k]["correct"] == passkey_cell(model, ENC, n, d, 3, 1234 + 1000 * (k // 2) + k % 2, piece=100,
                                                   align="right")
    out = run([sys.executable, "eval_passkey.py", f"--ckpt={ckpt}", "--inspect", "--lengths=200", "--depths=0.5",
               "--threads=1", f"--png={tmp_path / 'look'}"])
    assert "global-memory gate" in out and "FIFO" in out and "answer (argmax" in out
    pngs = sorted(p.name for p in tmp_path.glob("look_*.png"))  # matplotlib is a test dependency (README)
    assert pngs == ["look_attention.png", "look_fifo.png", "look_gates.png"]
    out = run([sys.executable, "sample.py", f"--ckpt={ckpt}", "--prompt=hello there", "--max_new_tokens=7",
               "--threads=1"])
    assert "7 tokens generated" in out and "peak memory" in out


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["comet", "global_only", "temp_only", "no_gate", "sliding_window",
                                     "full_attention"])
def test_every_ablation_config_builds_and_trains_one_step(tmp_path, variant):
    import torch
    run([sys.executable, "train.py", f"config/{variant}.py", f"--out_dir={tmp_path}", "--max_iters=1",
         "--eval_interval=0", "--batch_size=2", "--threads=1"])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 1
    args = {k: ckpt["model_args"][k] for k in ("chunk_size", "n_global", "temp_budget", "global_gate", "window")}
    assert args == {"comet": dict(chunk_size=64, n_global=16, temp_budget=32, global_gate=True, window=0),
                    "global_only": dict(chunk_size=64, n_global=16, temp_budget=0, global_gate=True, window=0),
                    "temp_only": dict(chunk_size=64, n_global=0, temp_budget=32, global_gate=True, window=0),
                    "no_gate": dict(chunk_size=64, n_global=16, temp_budget=32, global_gate=False, window=0),
                    "sliding_window": dict(chunk_size=0, n_global=16, temp_budget=32, global_gate=True, window=48),
                    "full_attention": dict(chunk_size=0, n_global=16, temp_budget=32, global_gate=True, window=0),
                    }[variant]


def test_a_trial_counts_only_when_every_answer_token_is_right(monkeypatch):
    # an oracle that answers every trial exactly, except one wrong digit in trial 0 and trial 3
    rng = random.Random(5)
    answers = np.stack([make_sample("passkey", ENC, 200, 0.5, rng, 5).answer for _ in range(6)])
    answers[0, 2] = answers[0, 2] + 1 if answers[0, 2] < ord("9") else ord("0")
    answers[3, -1] = ord("x")

    def oracle(model, idx, n_new, temperature, state):
        assert n_new == answers.shape[1] and idx.size(0) == 6
        return torch.from_numpy(answers), state

    monkeypatch.setattr(eval_passkey, "generate", oracle)
    model = tiny_model(vocab_size=ENC.n_vocab)
    assert passkey_cell(model, ENC, 200, 0.5, 6, seed=5) == 4


def test_right_answer_tokens_are_counted_per_position(monkeypatch):
    rng = random.Random(5)
    answers = np.stack([make_sample("passkey", ENC, 200, 0.5, rng, 5).answer for _ in range(6)])
    answers[0, 2], answers[3, 2], answers[3, -1] = ord("x"), ord("x"), ord("x")  # the oracle gets these wrong
    monkeypatch.setattr(eval_passkey, "generate", lambda model, idx, n, temperature, state: (torch.from_numpy(answers),
                                                                                            state))
    tokens_right = []
    passkey_cell(tiny_model(vocab_size=ENC.n_vocab), ENC, 200, 0.5, 6, seed=5, tokens_right=tokens_right)
    assert tokens_right == [6, 6, 4, 6, 6, 5]


def test_pipeline_ranks_loss_shares_add_up_to_the_passkey_loss():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 40, 11), torch.randint(11, (3, 40))
    answer = torch.zeros(3, 40, dtype=torch.bool)
    answer[:, 30:35] = True
    whole = train.passkey_loss(logits, targets, answer)
    for cut in (8, 32):  # a rank boundary before and inside the answer
        shares = [train.passkey_loss(logits[:, s], targets[:, s], answer[:, s], whole=answer)
                  for s in (slice(0, cut), slice(cut, 40))]
        assert torch.allclose(sum(shares), whole, rtol=1e-6)


def slice_model():
    config = dict(train.DEFAULTS, n_layer=2, n_embd=32, n_head=2, n_kv_head=2, ffn_hidden=64, chunk_size=16,
                  n_global=2, stride=4, temp_budget=8)
    torch.manual_seed(0)
    return train.build_model(config, ENC, None, "cpu", verbose=False)


def train_settings(monkeypatch, **over):
    """train's settings as main() sets them (DEFAULTS, RAM's among them), `over` on top: what pick_method,
    lm_loss and train_step read."""
    for k, v in {**train.DEFAULTS, **over}.items():
        monkeypatch.setattr(train, k, v, raising=False)


def sliced_backward(monkeypatch, model, slices):
    """Loss and gradients of one batch of 5 passkey sequences, its rows in `slices` slices on threads."""
    train_settings(monkeypatch, chunk_size=16)
    rows = data.sample_batch(ENC, 5, 150, seed=3)
    method = train.pick_method(None, "cpu", slices)
    batch, _ = method.batch(rows, "left")
    model.zero_grad(set_to_none=True)
    loss, _ = train.forward_backward(model, method, batch, torch.autocast("cpu", enabled=False))
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("slices", [2, 3])
def test_a_batch_in_slices_on_threads_has_the_whole_batchs_loss_and_gradients(monkeypatch, slices):
    model = slice_model()
    whole, grads = sliced_backward(monkeypatch, model, 1)
    loss, sliced = sliced_backward(monkeypatch, model, slices)
    assert loss == pytest.approx(whole, rel=1e-6)
    for a, b in zip(sliced, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_batch_in_slices_on_threads_gives_the_same_gradients_bit_for_bit_every_time(monkeypatch):
    model = slice_model()
    first = sliced_backward(monkeypatch, model, 3)
    for _ in range(3):
        loss, grads = sliced_backward(monkeypatch, model, 3)
        assert loss == first[0] and all(torch.equal(a, b) for a, b in zip(grads, first[1]))


def test_training_in_batch_slices_follows_training_on_the_whole_batch(tmp_path):
    common = ("--max_iters=8", "--eval_interval=0", "--batch_size=4", "--threads=2")
    out = run(train_cmd(tmp_path / "sliced", *common, "--batch_threads=2"))
    assert "each batch in 2 slices, each on its own thread with 1 intra-op thread(s)" in out
    assert "each batch in" not in run(train_cmd(tmp_path / "whole", *common, "--batch_threads=1"))
    sliced, whole = losses(tmp_path / "sliced"), losses(tmp_path / "whole")
    assert [i for i, _ in sliced] == list(range(8))
    assert [loss for _, loss in sliced] == pytest.approx([loss for _, loss in whole], rel=1e-4)


def test_one_thread_trains_the_whole_batch_at_once(tmp_path):
    assert "each batch in" not in run(train_cmd(tmp_path, "--max_iters=1", "--eval_interval=0", "--threads=1"))


def test_each_training_step_reads_its_batch_with_its_iterations_chunk_plan(monkeypatch):
    model, seen, real = slice_model(), [], train.lm_loss
    train_settings(monkeypatch, chunk_size=16, min_len=110, max_len=150, batch_size=2, chunk_align="mixed")
    monkeypatch.setattr(train, "lm_loss", lambda m, batch, *a: seen.append(batch[3]) or real(m, batch, *a))
    method, optimizer = train.pick_method(None, "cpu", 2), train.make_optimizer(model, fused=False)
    for it in range(4, 8):
        train.train_step(model, optimizer, method, None, torch.autocast("cpu", enabled=False), ENC, it, [])
    assert seen == [train.batch_align(it) for it in range(4, 8) for _ in range(2)]  # two slices per step
    assert set(seen) == {"left", "right"}


@pytest.mark.parametrize("dev, dtype, method, compiled, slices", [
    ("cpu", torch.float32, "comet", False, 2), ("cpu", torch.float32, "truncate", False, 2),
    ("cpu", torch.float32, "ram", False, 1), ("cpu", torch.bfloat16, "comet", False, 1),
    ("cpu", torch.float32, "comet", True, 1), ("cuda", torch.float32, "comet", False, 1)])
def test_batches_are_sliced_only_where_slices_run_and_only_then_share_the_threads(monkeypatch, dev, dtype, method,
                                                                                 compiled, slices):
    for k, v in {"batch_threads": 2, "method": method, "compile": compiled}.items():
        monkeypatch.setattr(train, k, v)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert train.batch_slices(dev, dtype, None) == slices
        assert torch.get_num_threads() == 2 // slices
    finally:
        torch.set_num_threads(threads)
