"""train.py: the same seed gives the same losses, a killed run resumes exactly, settings fail early with one line,
batches and chunk plans are what the settings say, and the scripts run on what it trains."""
import json
import os
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
import pipeline
import train
from checkpoint import load_model, read_run, resume_settings
from configurator import RULES, check_ranges
from conftest import tiny_model
from data import get_tokenizer, make_passkey
from model import Transformer
from stream import ask

ROOT = Path(__file__).resolve().parents[1]
ENC = get_tokenizer("bytes")


def train_cmd(out_dir, *extra):
    return [sys.executable, "train.py", "config/smoke.py", f"--out_dir={out_dir}", "--eval_interval=0", *extra]


def run(cmd, timeout=300):
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [(r["iter"], r["loss"]) for r in map(json.loads, f)]


def settings(monkeypatch, **over) -> dict:
    """train's settings as main() sets them, `over` on top (the functions read the module's globals)."""
    config = {**train.DEFAULTS, **over}
    for k, v in config.items():
        monkeypatch.setattr(train, k, v)
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A smoke run of 10 steps: its out_dir (ckpt.pt, log.jsonl)."""
    out = tmp_path_factory.mktemp("smoke")
    run(train_cmd(out, "--max_iters=10"))
    return out


# --- end to end: train.py as a user runs it ------------------------------------------------------------------

def test_the_same_seed_gives_the_same_losses_and_another_seed_others(trained, tmp_path):
    run(train_cmd(tmp_path / "again", "--max_iters=10"))
    assert len(losses(trained)) == 10 and losses(tmp_path / "again") == losses(trained)
    run(train_cmd(tmp_path / "other", "--max_iters=10", "--seed=7"))
    assert losses(tmp_path / "other") != losses(trained)


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
    proc = subprocess.Popen(train_cmd(tmp_path, "--max_iters=100000", "--ckpt_interval=0"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "continue with --init_from=resume" in out, err[-2000:]
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == len(log.read_text().splitlines()) >= 3


def test_a_loss_that_turns_non_finite_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    poisoned = """
import math, sys, train
def setup(config, enc, ckpt, dev, pipe):
    recipe, seen = train.passkey_recipe(config, enc, ckpt, dev, pipe), []
    def batch(it):
        seen.append(it)
        return recipe.batch(it)
    def loss(m, b, rows=slice(None)):
        value, parts = recipe.loss(m, b, rows)
        return (value * math.nan if seen[-1] == 5 else value), parts
    return recipe._replace(batch=batch, loss=loss)
train.main(setup)
"""
    r = subprocess.run([sys.executable, "-c", poisoned, "config/smoke.py", f"--out_dir={tmp_path}", "--ckpt_interval=4",
                        "--eval_interval=0", "--max_iters=8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"error: the loss at iteration 5 is nan: stopped before updating the "
                                                 f"weights; {tmp_path}/ckpt.pt keeps the last checkpoint (resume it "
                                                 "with a lower --lr)")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 4 and len(losses(tmp_path)) == 5


def test_a_damaged_log_line_is_dropped_on_resume_with_a_warning(trained, tmp_path):
    copy = run_copy(trained, tmp_path / "copy")
    lines = (copy / "log.jsonl").read_text().splitlines(keepends=True)
    (copy / "log.jsonl").write_text("".join(lines[:4] + ["{torn by hand\n"] + lines[4:]))
    out = run(train_cmd(copy, "--init_from=resume", "--max_iters=12"))
    assert "warning:" in out and "1 damaged line(s) dropped" in out
    assert [i for i, _ in losses(copy)] == list(range(12)) and losses(copy)[:10] == losses(trained)


def test_a_moved_run_resumes_where_it_is_and_refuses_to_change_its_model(trained, tmp_path):
    moved = tmp_path / "moved"
    os.rename(run_copy(trained, tmp_path / "copy"), moved)
    r = subprocess.run(train_cmd(moved, "--init_from=resume", "--n_embd=64"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode and "n_embd" in r.stderr and "cannot change" in r.stderr
    run(train_cmd(moved, "--init_from=resume", "--max_iters=12"))
    assert [i for i, _ in losses(moved)] == list(range(12)) and losses(moved)[:10] == losses(trained)


def run_copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in ("ckpt.pt", "log.jsonl"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_a_bad_setting_stops_the_script_with_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run(train_cmd(tmp_path, "--curriculum=2.0"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "curriculum" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_a_frozen_base_under_bf16_is_held_in_bf16_and_never_changes(tmp_path):
    """--freeze_base with bf16 autocast: the base's matrices in bf16, bit for bit the initial weights after 4
    steps; the memories, the norms and every optimizer state fp32, and the memories trained."""
    run(train_cmd(tmp_path, "--max_iters=4", "--freeze_base", "--dtype=bfloat16"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    torch.manual_seed(ckpt["config"]["seed"])
    start = Transformer(load_model(str(tmp_path / "ckpt.pt"))[0].config).state_dict()  # as train.py builds it
    memory = [n for n in ckpt["model"] if Transformer.is_memory_param(n)]
    assert memory and all(ckpt["model"][n].dtype == torch.float32 for n in memory)
    assert any(not torch.equal(ckpt["model"][n], start[n]) for n in memory)
    for name, t in ckpt["model"].items():
        if name not in memory:
            assert t.dtype == (torch.bfloat16 if t.dim() >= 2 else torch.float32), name
            assert torch.equal(t, start[name].to(t.dtype)), name
    assert {s["exp_avg"].dtype for s in ckpt["optimizer"]["state"].values()} == {torch.float32}


def test_shards_resume_exactly_when_some_parameters_have_no_adamw_state_yet(tmp_path):
    """Sequences of at most two chunks, the second open: the global memory's gate is never used, so AdamW holds no
    state for it; resumed from shards it still has none, and the losses are those of a run never stopped."""
    args = ["--chunk_size=64", "--max_len=128", "--warmup=0", "--min_lr=1.0", "--curriculum=0"]
    run(train_cmd(tmp_path / "whole", "--max_iters=4", *args))
    run(train_cmd(tmp_path / "half", "--max_iters=2", "--ckpt_shards=True", *args))
    run([sys.executable, "train.py", f"--out_dir={tmp_path / 'half'}", "--init_from=resume", "--max_iters=4"])
    assert losses(tmp_path / "half") == losses(tmp_path / "whole")
    saved = checkpoint._saved_tensors(str(tmp_path / "half" / "ckpt-00000004.dcp"))
    assert "optimizer.memories.0.global_mem.gate.weight.step" not in saved  # none made up on loading
    assert "optimizer.memories.0.global_mem.adapter.up.weight.step" in saved


def test_missing_or_damaged_shards_are_one_clear_error_on_resume(tmp_path):
    run(train_cmd(tmp_path, "--max_iters=2", "--ckpt_shards=True"))
    shards = tmp_path / "ckpt-00000002.dcp"
    (piece,) = shards.glob("*.distcp")
    piece.write_bytes(piece.read_bytes()[:1000])
    r = subprocess.run(train_cmd(tmp_path, "--init_from=resume", "--max_iters=4"), cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode and len(r.stderr.strip().splitlines()) == 1 and "corrupt or truncated" in r.stderr
    (shards / ".metadata").unlink()
    with pytest.raises(FileNotFoundError, match="ckpt-00000002.dcp beside it, which is missing or incomplete"):
        checkpoint.read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert len(losses(tmp_path)) == 2


def test_eval_passkey_inspection_and_sample_run_on_what_train_py_wrote(trained, tmp_path):
    ckpt = str(trained / "ckpt.pt")
    out = run([sys.executable, "eval_passkey.py", f"--ckpt={ckpt}", "--lengths", "150,1000", "--depths", "0,1",
               "--trials=3", "--piece=100", "--threads=1", f"--json={tmp_path / 'p.json'}"])
    result = json.load(open(tmp_path / "p.json"))
    assert "length |" in out and result["tok_s"].keys() == result["peak_memory_mib"].keys() == {"150", "1000"}
    assert [(c["length"], c["depth"], c["trials"]) for c in result["cells"]] == [(150, 0, 3), (150, 1, 3),
                                                                                 (1000, 0, 3), (1000, 1, 3)]
    out = run([sys.executable, "inspection.py", f"--ckpt={ckpt}", "--length=200", "--depth=0.5", "--threads=1",
               f"--png={tmp_path / 'look'}"])
    assert "global-memory gate" in out and "FIFO" in out and "answer (argmax" in out
    assert sorted(p.name for p in tmp_path.glob("look_*.png")) == ["look_attention.png", "look_fifo.png",
                                                                   "look_gates.png"]
    out = run([sys.executable, "sample.py", f"--ckpt={ckpt}", "--prompt=hello there", "--max_new_tokens=7"])
    assert "7 tokens generated" in out and "peak memory" in out


@pytest.mark.parametrize("argv, written, noun", [
    (["eval_passkey.py", "--lengths=256", "--json=r.json"], "r.json", "JSON file"),
    (["eval_passkey.py", "--lengths=256", "--png=r.png"], "r.png", "PNG image"),
    (["bench.py", "--lengths=256", "--json=b.jsonl"], "b.jsonl", "JSON-lines file"),
    (["inspection.py", "--png=look"], "look_gates.png", "PNG image"),
    (["sample.py", "--save_state=s.state"], "s.state", "state file")])
def test_no_script_writes_over_a_file_of_another_kind_and_it_says_so_before_any_work(trained, tmp_path, argv, written,
                                                                                    noun):
    ckpt = (trained / "ckpt.pt").read_bytes()
    (tmp_path / written).write_bytes(ckpt)  # somebody's checkpoint, named as the output would be
    flag = argv[-1].split("=")[0]
    r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]] + [f"--ckpt={trained / 'ckpt.pt'}"] * (
        argv[0] != "bench.py"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {flag}: {written} exists and is not a {noun}: refusing to replace it; choose another name"]
    assert (tmp_path / written).read_bytes() == ckpt and "accuracy" not in r.stdout


# --- settings, checked in-process ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, names", [
    (dict(curriculum=2.0), "curriculum"), (dict(edge_depths=-0.1), "edge_depths"), (dict(batch_size=0), "batch_size"),
    (dict(batch_threads=0), "batch_threads"), (dict(min_len=50), "too short"), (dict(chunk_align="middle"),
                                                                                "chunk_align"),
    (dict(pipeline=True, chunk_size=0), "chunk_size > 0"), (dict(freeze_base=True, chunk_size=0), "chunk_size > 0"),
    (dict(checkpoint_activations=True, chunk_size=0), "chunk_size > 0"), (dict(dtype="float16"), "dtype"),
    (dict(freeze_base=True, ckpt_shards=True), "drop --ckpt_shards"), (dict(filler="/no/such.txt"), "does not exist"),
    (dict(sink_token=ENC.n_vocab), "not a token of this tokenizer"),
])
def test_a_bad_setting_is_one_clear_error_naming_it(bad, names):
    with pytest.raises((ValueError, OSError), match=re.escape(names)):
        check_ranges({**train.DEFAULTS, **bad}, RULES)  # what configure checks of every script's numbers
        train.check_settings({**train.DEFAULTS, **bad}, ENC)


def test_resume_without_a_checkpoint_or_over_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", f"--out_dir={tmp_path}", "--init_from=resume"])
    with pytest.raises(SystemExit, match="cannot resume: no checkpoint at"):
        read_run(train.DEFAULTS, ())
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    monkeypatch.setattr(sys, "argv", ["train.py", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="exists: continue it with --init_from=resume"):
        read_run(train.DEFAULTS, ())
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"


@pytest.mark.parametrize("used", ["log.jsonl", "ckpt-00000300.dcp", "memories.safetensors"])
def test_a_new_run_never_writes_into_the_out_dir_of_another(tmp_path, monkeypatch, used):
    (tmp_path / used).write_bytes(b"another run's")
    monkeypatch.setattr(sys, "argv", ["train.py", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=f"holds another run's {used}: train into another --out_dir"):
        read_run(train.DEFAULTS, ())
    assert [p.name for p in tmp_path.iterdir()] == [used] and (tmp_path / used).read_bytes() == b"another run's"


@pytest.mark.parametrize("damage, says", [(dict(iter_num="300"), "iter_num (int)"), (dict(config=[1]), "config (dict)"),
                                          (dict(rng={}), "rng"), (dict(config=dict(lr="fast")), "lr='fast'")])
def test_a_checkpoint_whose_fields_have_the_wrong_type_is_one_line_on_resume(monkeypatch, damage, says):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    ckpt = {**dict(optimizer={}, iter_num=3, config=dict(train.DEFAULTS), rng=dict(torch=torch.get_rng_state())),
            **damage}
    with pytest.raises(ValueError, match=re.escape(says)):
        resume_settings(ckpt, "out", train.DEFAULTS, ())


def test_a_leftover_torchrun_environment_is_one_line_naming_the_remedy(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 .*give --dp=2 or --pipeline=True; or unset RANK and WORLD_SIZE"):
        train.check_settings(dict(train.DEFAULTS), ENC)


@pytest.mark.parametrize("key, then, now", [("edge_depths", 0.1, 0.3), ("chunk_align", "left", "right"),
                                            ("batch_threads", 1, 3)])
def test_a_checkpoint_from_before_a_setting_resumes_with_what_it_was_trained_with(monkeypatch, key, then, now):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    saved = {k: v for k, v in train.DEFAULTS.items() if k != key}
    ckpt = dict(optimizer={}, iter_num=3, config=saved, rng=dict(torch=torch.get_rng_state()))
    assert resume_settings(ckpt, "out", train.DEFAULTS, ())[key] == then != train.DEFAULTS[key]
    assert resume_settings({**ckpt, "config": {**saved, key: now}}, "out", train.DEFAULTS, ())[key] == now


def test_a_run_of_rams_entry_point_resumes_only_there(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    ckpt = dict(optimizer={}, iter_num=3, config={**train.DEFAULTS, "method": "ram", "task": "facts"},
                rng=dict(torch=torch.get_rng_state()))
    with pytest.raises(ValueError, match="python -m ram.train_ram"):
        resume_settings(ckpt, "out", train.DEFAULTS, ())


@pytest.mark.parametrize("name", ["comet", "full_attention", "global_only", "no_gate", "temp_only", "sliding_window"])
def test_every_ablation_config_pins_the_ablations_recipe_and_trains_a_step(monkeypatch, name):
    pinned = runpy.run_path(str(ROOT / "config" / f"{name}.py"))
    recipe = dict(edge_depths=0.1, max_len=512, chunk_align="left", batch_threads=1, max_iters=1800)
    assert {k: pinned[k] for k in recipe} == recipe and any(train.DEFAULTS[k] != v for k, v in recipe.items())
    config = settings(monkeypatch, **{k: v for k, v in pinned.items() if k in train.DEFAULTS}, batch_size=2)
    torch.manual_seed(0)
    r = train.passkey_recipe(config, ENC, None, "cpu", None)
    optimizer = train.make_optimizer(r.model, fused=False)
    record, _, _ = train.train_step(r.model, optimizer, r, None, torch.autocast("cpu", enabled=False), 0, [])
    assert record["loss"] > 0 and r.model.config.window == pinned.get("window", 0)


def test_the_checkpoint_activations_setting_reaches_the_model():
    for on in (False, True):
        model, _ = train.build_model({**train.DEFAULTS, "checkpoint_activations": on}, ENC, None, "cpu")
        assert model.checkpoint_activations is on


# --- batches, chunk plans and the loss ---------------------------------------------------------------------------

def test_far_keys_lie_beyond_the_fifos_reach_so_only_the_global_memory_can_carry_them(monkeypatch):
    settings(monkeypatch, far_keys=1.0, chunk_size=64, stride=8, temp_budget=16, min_len=600, max_len=700)
    reach = 64 * (1 + 16 // 8)  # the question's chunk and the two chunks the FIFO holds
    for it in range(5):
        samples, length = train.get_samples(ENC, it)
        for s in samples:
            assert s.evidence[1] <= length - reach, (it, s.evidence, length)
    settings(monkeypatch, far_keys=0.0, chunk_size=64, stride=8, temp_budget=16, min_len=600, max_len=700)
    assert any(s.evidence[1] > length - reach for it in range(5) for s in train.get_samples(ENC, it)[0])


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_the_edge_depths_setting_decides_where_training_keys_sit(monkeypatch, share):
    depths = []
    settings(monkeypatch, edge_depths=share)
    train.get_samples(ENC, 5, make=lambda enc, n, d, *a: depths.append(d) or make_passkey(enc, n, d, *a))
    assert len(depths) == train.batch_size and sum(d in (0.0, 1.0) for d in depths) == share * len(depths)


@pytest.mark.parametrize("align", ["left", "right"])
def test_training_cuts_chunks_as_the_chunk_align_setting_says(monkeypatch, align):
    seen = []
    settings(monkeypatch, chunk_align=align)
    monkeypatch.setattr(Transformer, "forward_chunk", lambda self, idx, memory, closed: seen.append(
        (idx.size(1), closed)) or (torch.zeros(idx.size(0), idx.size(1), self.config.n_embd), memory))
    x = torch.zeros(2, 21, dtype=torch.long)
    train.lm_loss(tiny_model(), (x, x, x > 0, train.batch_align(0)), None)
    assert seen == ([(8, True), (8, True), (5, False)] if align == "left" else [(5, True), (8, True), (8, True)])


def test_mixed_chunk_plans_cut_half_the_iterations_right_aligned_the_same_way_every_run(monkeypatch):
    settings(monkeypatch, chunk_align="mixed")
    plans = [train.batch_align(it) for it in range(2000)]
    assert set(plans) == {"left", "right"} and 900 < plans.count("right") < 1100
    assert plans[:8] == ["left"] * 5 + ["right", "left", "left"]  # a pure function of the iteration


def test_the_chunked_loss_equals_the_whole_loss_and_its_gradients_without_whole_logits(monkeypatch):
    settings(monkeypatch, lm_weight=0.1, loss_chunk=0)
    model, rng = tiny_model(), np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, model.config.vocab_size, (3, 90)))
    batch = (x, x.roll(-1, 1), torch.from_numpy(rng.random((3, 90)) < 0.1), "left")
    whole = train.lm_loss(model, batch, None)[0]
    grads = torch.autograd.grad(whole, list(model.parameters()), allow_unused=True)
    widest = []
    model.output.register_forward_hook(lambda m, i, out: widest.append(out.size(1)))
    monkeypatch.setattr(train, "loss_chunk", 32)
    chunked = train.lm_loss(model, batch, None)[0]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
    for g, h in zip(grads, torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, rtol=1e-5, atol=1e-7))
    assert max(widest) == 32  # forward and recomputation alike: the logits never held more than one piece


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


@pytest.mark.parametrize("align", ["left", "right"])
def test_the_in_training_evaluation_is_greedy_decodings_exact_match(monkeypatch, align):
    """Teacher-forced argmax right at every answer position is exactly greedy decoding getting the whole answer:
    the evaluation counts what streaming and generating count, trial by trial."""
    settings(monkeypatch, chunk_align=align, max_len=203, eval_trials=10, seed=3)
    model = tiny_model(vocab_size=ENC.n_vocab)
    for p in model.parameters():  # a model that gets some trials right and others wrong
        torch.nn.init.normal_(p, std=0.3)
    greedy = 0
    for samples in train.eval_samples(ENC):
        tokens = lambda a, b: torch.from_numpy(np.stack([s.tokens(a, b) for s in samples]))
        out, _ = ask(model, tokens, 203 - 6, 6, align=align)
        greedy += int((out.numpy() == np.stack([s.answer for s in samples])).all(1).sum())
    assert train.evaluate(model, ENC) == greedy / 10


# --- a batch in slices on threads (pipeline.sliced_backward) ---------------------------------------------------

def sliced(model, slices: int, monkeypatch) -> tuple[float, list]:
    """The loss and gradients of one batch of 5 passkey sequences, its rows in `slices` slices on threads."""
    settings(monkeypatch)
    (x, y, answer, align), _ = train.lm_batch(data.sample_batch(ENC, 5, 150, seed=3), "cpu", "left")
    model.zero_grad(set_to_none=True)
    loss = pipeline.sliced_backward(lambda rows: train.lm_loss(model, (x, y, answer, align), None, rows)[0], 5,
                                    slices, list(model.parameters()))
    return float(loss), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("slices", [2, 3])
def test_a_batch_in_slices_on_threads_has_the_whole_batchs_loss_and_gradients(monkeypatch, slices):
    model = tiny_model(vocab_size=ENC.n_vocab, chunk_size=16)
    whole, grads = sliced(model, 1, monkeypatch)
    loss, parts = sliced(model, slices, monkeypatch)
    assert loss == pytest.approx(whole, rel=1e-6)
    for a, b in zip(parts, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_batch_in_slices_on_threads_gives_the_same_gradients_bit_for_bit_every_time(monkeypatch):
    model = tiny_model(vocab_size=ENC.n_vocab, chunk_size=16)
    first = sliced(model, 3, monkeypatch)
    for _ in range(2):
        loss, grads = sliced(model, 3, monkeypatch)
        assert loss == first[0] and all(torch.equal(a, b) for a, b in zip(grads, first[1]))


@pytest.mark.parametrize("dev, dtype, compiled, slices", [("cpu", torch.float32, False, 2),
                                                          ("cpu", torch.bfloat16, False, 1),
                                                          ("cpu", torch.float32, True, 1),
                                                          ("cuda", torch.float32, False, 1)])
def test_batches_are_sliced_only_where_slices_run_and_then_share_the_threads(dev, dtype, compiled, slices):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert pipeline.cpu_slices(2, dev, dtype, compiled) == slices and torch.get_num_threads() == 2 // slices
    finally:
        torch.set_num_threads(threads)
