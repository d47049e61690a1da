"""pipeline.py (S7): P gloo processes give the loss and gradients of one process; failures stop every rank;
scripts/pipeline_sim.py's simulator."""
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_model
from conftest import tiny_model
from llama import freeze_base
import pipeline
from pipeline import rank_chunks
from scripts.pipeline_sim import launch, simulate

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 20.0  # seconds any rank waits for another in these tests

# (name, ranks, tokens, overrides, bptt_chunks, schedule). The tiny model: chunk 8 with 2 compression
# tokens, a FIFO of 3 slots (full after 2 chunks) unless overridden.
CASES = {
    "even": (2, 64, {}, 0, "wavefront"),            # 8 chunks: 4 + 4
    "naive": (3, 64, {}, 0, "naive"),               # naive context parallelism: 2 + 3 + 3
    "uneven": (3, 75, {}, 0, "wavefront"),          # 10 chunks: 3 + 3 + 4, the last one open (partial)
    "fifo_filling": (3, 40, dict(temp_budget=12), 0, "wavefront"),  # 5 chunks: 1 + 2 + 2, FIFO never full
    "bptt_cut_at_a_rank": (3, 75, {}, 2, "wavefront"),  # ranks start at chunks 0, 3, 6: cut at 6 only
    "global_memory_only": (2, 48, dict(temp_budget=0), 0, "wavefront"),
    "temporary_memory_only": (2, 48, dict(n_global=0), 0, "wavefront"),
    "no_memories": (2, 48, dict(n_global=0, temp_budget=0), 0, "wavefront"),  # nothing to send
    # every layer-over-chunk step recomputed in backward on the ranks; the reference keeps everything
    "checkpointed_activations": (3, 75, dict(checkpoint_activations=True), 2, "wavefront"),
    # the right-aligned chunk plan: a short first chunk of 3 tokens, then 9 full ones (3 + 3 + 4)
    "right_aligned": (3, 75, dict(align="right"), 2, "wavefront"),
    # ... with a FIFO still filling at the ranks' borders: rank 1 receives 5 slots after a short first chunk, not 6
    "right_aligned_fifo_filling": (3, 75, dict(align="right", temp_budget=12), 0, "wavefront"),
    # a sink row in front of every chunk (S2): it runs alone at position 0 in each layer step
    "sink_row": (3, 75, dict(sink_token=0), 2, "wavefront"),
}


def batch(n_tokens: int, rows: int = 2):
    idx = torch.randint(32, (rows, n_tokens), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, 1)
    targets[:, -1] = -1  # ignored, as at the end of a training sequence
    return idx, targets


def pipelined_step(pipe, n_tokens, overrides, bptt_chunks):
    """On every rank: this rank's share of the loss, backward, all-reduce; returns (loss, gradients)."""
    overrides = dict(overrides)
    checkpointed = overrides.pop("checkpoint_activations", False)
    align = overrides.pop("align", "left")
    model = tiny_model(**overrides).train()
    model.checkpoint_activations = checkpointed
    idx, targets = batch(n_tokens)
    logits, span = pipe.forward(model, idx, bptt_chunks, align)
    loss = F.cross_entropy(logits.flatten(0, 1), targets[:, span].flatten(), ignore_index=-1, reduction="sum")
    share = loss / (targets != -1).sum()
    share.backward()
    total, _ = pipe.all_reduce(model, share)
    return total, {n: p.grad for n, p in model.named_parameters()}


def pipelined_steps(pipe, cases: dict) -> dict:
    """Several cases in one process group (starting processes costs seconds): name -> `pipelined_step`'s result."""
    out = {}
    for name, (n_tokens, overrides, bptt, schedule) in cases.items():
        pipe.schedule = schedule
        out[name] = pipelined_step(pipe, n_tokens, overrides, bptt)
    return out


def one_process_step(n_tokens, overrides, bptt_chunks, rows=2):
    model = tiny_model(**{k: v for k, v in overrides.items() if k not in ("checkpoint_activations",
                                                                          "freeze_base", "align")}).train()
    if overrides.get("freeze_base"):
        freeze_base(model)
    idx, targets = batch(n_tokens, rows)
    _, loss = model(idx, targets, bptt_chunks=bptt_chunks, align=overrides.get("align", "left"))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def results():
    """Every case, the cases of one world size in one launch of processes."""
    out = {}
    for ranks in sorted({c[0] for c in CASES.values()}):
        cases = {name: c[1:] for name, c in CASES.items() if c[0] == ranks}
        res = launch(pipelined_steps, ranks, cases, timeout=TIMEOUT)
        assert all(r.status == "ok" for r in res), res
        for name, (n_tokens, overrides, bptt, _) in cases.items():
            out[name] = [r.value[name] for r in res], one_process_step(n_tokens, overrides, bptt)
    return out


def assert_same_step(per_rank, reference):
    ref_loss, ref_grads = reference
    for loss, grads in per_rank:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            if ref is None:  # unused by the whole step (e.g. a gate before its second update): unused here too
                assert grads[name] is None, name
                continue
            assert grads[name] is not None, name
            err = (grads[name] - ref).abs().max() / ref.abs().max()
            assert err <= 1e-5, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES)
def test_pipeline_loss_and_every_gradient_equal_one_process(results, case):
    assert_same_step(*results[case])


def sharded_step(pipe, n_tokens, rows, checkpointed=False, overrides=None):
    """On every rank of a (pp, dp) grid: its dp slice of the batch, FSDP2 over dp, the pipeline over pp;
    returns (loss, every gradient gathered whole)."""
    overrides = dict(overrides or {})
    frozen = overrides.pop("freeze_base", False)
    model = tiny_model(**overrides).train()
    if frozen:  # units holding frozen and trained parameters side by side
        freeze_base(model)
    model.checkpoint_activations = checkpointed
    pipe.shard(model)
    idx, targets = batch(n_tokens, rows * pipe.dp)
    d = pipe.mesh.get_local_rank("dp") if pipe.mesh is not None else 0
    idx, targets = idx[d * rows:(d + 1) * rows], targets[d * rows:(d + 1) * rows]
    logits, span = pipe.forward(model, idx)
    loss = F.cross_entropy(logits.flatten(0, 1), targets[:, span].flatten(), ignore_index=-1, reduction="sum")
    (loss / (targets != -1).sum()).backward()
    total, _ = pipe.all_reduce(model, loss / (targets != -1).sum())
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # a collective over dp
    return total, {n: None if p.grad is None else full(p.grad) for n, p in model.named_parameters()}


SHARDED = {  # (pp, dp, tokens, checkpointed, overrides). 16 tokens: the last rank's one chunk stays open (no readout
    "pp1_dp2": (1, 2, 64, False, {}), "pp2_dp1": (2, 1, 64, False, {}),  # rows there; 3 of them: uneven shards)
    "pp2_dp2": (2, 2, 64, False, {}), "pp2_dp2_last_rank_never_closes": (2, 2, 16, False, dict(n_global=3)),
    "pp2_dp2_checkpointed": (2, 2, 44, True, {}), "pp2_dp2_frozen_base": (2, 2, 64, False, dict(freeze_base=True)),
}


def sharded_steps(pipe, cases: dict) -> dict:
    return {name: sharded_step(pipe, tokens, 2, checkpointed, overrides)
            for name, (tokens, checkpointed, overrides) in cases.items()}


@pytest.fixture(scope="module")
def sharded():
    """Every (pp, dp) case, the cases of one grid in one launch of processes."""
    out = {}
    for pp, dp in sorted({c[:2] for c in SHARDED.values()}):
        cases = {name: c[2:] for name, c in SHARDED.items() if c[:2] == (pp, dp)}
        res = launch(sharded_steps, pp * dp, cases, dp=dp, timeout=TIMEOUT)
        assert all(r.status == "ok" for r in res), res
        for name, (tokens, _, overrides) in cases.items():
            out[name] = [r.value[name] for r in res], one_process_step(tokens, overrides, 0, rows=2 * dp)
    return out


@pytest.mark.parametrize("case", SHARDED)
def test_sharded_pipeline_loss_and_every_gradient_equal_one_process(sharded, case):
    """pp x dp ranks (FSDP2 over dp, gloo): the loss and every gradient of one process reading all rows."""
    assert_same_step(*sharded[case])


def test_rank_chunks_cover_every_chunk_once_in_order_with_sizes_differing_by_at_most_one():
    for n_chunks in range(1, 13):
        for world in range(1, n_chunks + 1):
            blocks = [rank_chunks(n_chunks, r, world) for r in range(world)]
            assert [c for b in blocks for c in b] == list(range(n_chunks))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_fewer_chunks_than_ranks_is_a_clear_error():
    with pytest.raises(ValueError, match="3 chunks, fewer than the 4 ranks"):
        rank_chunks(3, 0, 4)


# --- a rank that dies, hangs or raises stops every rank within the timeout ----------------------------

def failing_step(pipe, how):
    """Rank 1 fails when it reaches layer 1 of the forward pass."""
    model = tiny_model().train()
    step = model.layer_step

    def layer_step(l, *args, **kwargs):
        if pipe.rank == 1 and l == 1:
            if how == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == "hangs":
                time.sleep(3600)
            raise RuntimeError("injected failure")
        return step(l, *args, **kwargs)

    model.layer_step = layer_step
    idx, targets = batch(72)
    logits, span = pipe.forward(model, idx)
    logits.sum().backward()
    pipe.all_reduce(model, logits.sum())


@pytest.mark.parametrize("how", ["killed", "hangs", "raises"])
def test_a_failing_rank_makes_the_others_exit_nonzero_within_the_timeout_naming_it(how):
    timeout = 3.0
    res = launch(failing_step, 3, how, timeout=timeout, deadline=timeout + 6)
    assert res[1].status == "died"  # it never reported
    for r in (res[0], res[2]):
        assert r.code == 1 and r.status == "error", r
        assert "rank 1 died, raised or is stuck" in r.value and "layer-1 memories" in r.value
        assert r.seconds < timeout + 2
    assert "receive layer-1 memories from rank 1" in res[2].value  # forward: rank 2 waits for rank 1
    assert "gradient of its layer-1 memories from rank 1" in res[0].value  # backward: rank 0 waits too


# --- the schedule simulator ----------------------------------------------------------------------------

def test_simulated_wavefront_utilisation_is_layers_over_layers_plus_ranks_minus_one():
    for layers, ranks in [(4, 2), (28, 8), (3, 5)]:
        _, wave = simulate(layers, ranks, 1.0, 0.0, 2.0, "wavefront")
        _, naive = simulate(layers, ranks, 1.0, 0.0, 2.0, "naive")
        assert wave == pytest.approx(layers / (layers + ranks - 1))
        assert naive == pytest.approx(1 / ranks)


def test_simulated_messages_only_add_time():
    for schedule in ("wavefront", "naive"):
        times = [simulate(8, 4, 1.0, m, 2.0, schedule)[0] for m in (0.0, 0.1, 1.0)]
        assert times == sorted(times) and times[0] < times[-1]
        assert simulate(8, 1, 1.0, 5.0, 2.0, schedule)[0] == pytest.approx(8 * 3.0)  # one rank sends nothing


def test_simulate_command_prints_both_schedules():
    out = subprocess.run([sys.executable, "-m", "scripts.pipeline_sim", "--simulate", "--layers", "28", "--ranks", "8"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "naive: step" in out and "wavefront: step" in out and "80.0%" in out


# --- train.py under torchrun ---------------------------------------------------------------------------

def train(out_dir, *extra, ranks=0):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*(launcher if ranks else [sys.executable]), "train.py", "config/smoke.py", f"--out_dir={out_dir}",
           "--eval_interval=0", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_torchrun_training_over_pp_x_dp_gives_the_loss_curve_of_one_process_reading_every_slice(tmp_path):
    """The pipeline composed with FSDP2 over dp (each rank reads its slice of a batch of dp x batch_size rows): the
    loss curve of one process reading all the rows. (2 ranks of either alone: the GPU check's dry run,
    tests/test_gpu_check.py.)"""
    one = train(tmp_path / "one", "--max_iters=6", "--batch_size=4")
    grid = train(tmp_path / "grid", "--max_iters=6", "--batch_size=2", "--dp=2", "--pipeline=True", ranks=4)
    assert one.returncode == 0 and grid.returncode == 0, grid.stderr[-3000:]
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "grid")]
    assert len(curves[0]) == 6 and curves[1] == pytest.approx(curves[0], rel=1e-5)


def test_bf16_sharded_training_follows_one_process_under_autocast(tmp_path):
    """--dtype=bfloat16 with dp=2: bf16 weights gathered (fp32 masters, fp32 reduction), inputs left to
    autocast; the loss curve of one process's bf16 autocast, up to bf16 rounding."""
    one = train(tmp_path / "one", "--max_iters=6", "--batch_size=4", "--dtype=bfloat16")
    grid = train(tmp_path / "grid", "--max_iters=6", "--batch_size=2", "--dtype=bfloat16", "--dp=2", ranks=2)
    assert one.returncode == 0 and grid.returncode == 0, grid.stderr[-3000:]
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "grid")]
    assert len(curves[1]) == 6 and curves[1] == pytest.approx(curves[0], rel=2e-2)


def test_a_bf16_frozen_base_sharded_over_dp_stays_bit_for_bit_the_one_of_one_process(tmp_path):
    """--freeze_base --dtype=bfloat16 --dp=2: units hold bf16 frozen matrices beside fp32 memories; after 4
    steps the gathered base is bit for bit one process's, and the loss follows it up to bf16 rounding (the
    memories equal one process's in fp32: test_llama's sharded frozen base)."""
    args = ["--max_iters=4", "--freeze_base", "--dtype=bfloat16"]
    one = train(tmp_path / "one", *args, "--batch_size=4")
    grid = train(tmp_path / "grid", *args, "--batch_size=2", "--dp=2", ranks=2)
    assert one.returncode == 0 and grid.returncode == 0, grid.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["model"] for d in ("one", "grid"))
    assert a.keys() == b.keys()
    memory = {n for n in a if tiny_model().is_memory_param(n)}
    assert memory and all(b[name].dtype == torch.float32 for name in memory)
    for name in a.keys() - memory:
        assert b[name].dtype == a[name].dtype and torch.equal(b[name], a[name]), name
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "grid")]
    assert len(curves[1]) == 4 and curves[1] == pytest.approx(curves[0], rel=2e-2)


def test_checkpoints_resume_exactly_across_dp_layouts(tmp_path):
    """A constant learning rate and no curriculum, so that a run stopped at 4 and resumed to 8 steps must
    match a run of 8: the gathered checkpoint (optimizer states keyed by name) resumes on dp=2 and on dp=1."""
    const = ["--warmup=0", "--min_lr=1.0", "--curriculum=0", "--batch_size=2"]
    whole = train(tmp_path / "whole", "--max_iters=8", "--dp=2", *const, ranks=2)
    half = train(tmp_path / "half", "--max_iters=4", "--dp=2", *const, ranks=2)
    assert whole.returncode == 0 and half.returncode == 0, half.stderr[-3000:]
    shutil.copytree(tmp_path / "half", tmp_path / "one")
    again = train(tmp_path / "half", "--init_from=resume", "--max_iters=8", "--dp=2", ranks=2)
    alone = train(tmp_path / "one", "--init_from=resume", "--max_iters=8", "--dp=1", "--batch_size=4")
    assert again.returncode == 0 and alone.returncode == 0, (again.stderr + alone.stderr)[-3000:]
    # and the other way: one process's checkpoint (optimizer states by position) resumed sharded
    first = train(tmp_path / "first", "--max_iters=4", "--batch_size=4", *const[:-1])
    grid = train(tmp_path / "first", "--init_from=resume", "--max_iters=8", "--dp=2", "--batch_size=2", ranks=2)
    assert first.returncode == 0 and grid.returncode == 0, grid.stderr[-3000:]
    curve = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")]
    assert len(curve("whole")) == 8
    assert curve("half") == pytest.approx(curve("whole"), rel=1e-6)
    assert curve("one") == pytest.approx(curve("whole"), rel=1e-5)
    assert curve("first") == pytest.approx(curve("whole"), rel=1e-5)


def test_shards_written_by_each_rank_resume_exactly_on_another_layout_and_open_in_one_process(tmp_path):
    """--ckpt_shards: each of pp2 x dp2's ranks writes its own pieces (torch.distributed.checkpoint, no rank
    gathers), the file names the directory; resumed on pp1 x dp2 and in one process, the losses of a run never
    stopped; load_model (sample.py) reads every shard into one model; the last two directories are kept."""
    const = ["--warmup=0", "--min_lr=1.0", "--curriculum=0"]
    whole = train(tmp_path / "whole", "--max_iters=6", "--dp=2", "--batch_size=2", *const, ranks=2)
    grid = train(tmp_path / "grid", "--max_iters=3", "--dp=2", "--pipeline=True", "--batch_size=2", "--ckpt_interval=1",
                 "--ckpt_shards=True", *const, ranks=4)
    assert whole.returncode == 0 and grid.returncode == 0, grid.stderr[-3000:]
    ckpt = torch.load(tmp_path / "grid" / "ckpt.pt", weights_only=True)
    assert ckpt["shards"] == "ckpt-00000003.dcp" and ckpt["model"] == {} and "state" not in ckpt["optimizer"]
    assert sorted(p.name for p in (tmp_path / "grid").glob("ckpt-*")) == ["ckpt-00000002.dcp", "ckpt-00000003.dcp"]
    assert len(list((tmp_path / "grid" / ckpt["shards"]).glob("*.distcp"))) == 4  # a file of shards per rank
    shutil.copytree(tmp_path / "grid", tmp_path / "one")
    dp2 = train(tmp_path / "grid", "--init_from=resume", "--max_iters=6", "--pipeline=False", ranks=2)
    one = train(tmp_path / "one", "--init_from=resume", "--max_iters=6", "--dp=1", "--pipeline=False", "--batch_size=4")
    assert dp2.returncode == 0 and one.returncode == 0, (dp2.stderr + one.stderr)[-3000:]
    curve = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")]
    assert len(curve("whole")) == 6
    assert curve("grid") == pytest.approx(curve("whole"), rel=1e-5)
    assert curve("one") == pytest.approx(curve("whole"), rel=1e-5)
    sharded, gathered = (load_model(str(tmp_path / d / "ckpt.pt"))[0].state_dict() for d in ("grid", "whole"))
    assert sharded.keys() == gathered.keys()
    assert all(torch.allclose(sharded[n], gathered[n], rtol=1e-4, atol=1e-6) for n in gathered)


@pytest.mark.parametrize("ranks, args, message", [
    (3, ["--dp=2", "--pipeline=True"], "3 processes cannot form pp x dp with dp=2: the world size must be a multiple"),
    (4, ["--dp=2"], "4 processes, dp=2: without pipeline=True every process is a dp rank (--dp=4)"),
    (0, ["--dp=2"], "pipeline=True or dp > 1 needs torchrun"),
])
def test_bad_sharded_layouts_are_one_clear_error(tmp_path, ranks, args, message):
    r = train(tmp_path, "--max_iters=1", *args, ranks=ranks)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]


def test_torchrun_with_fewer_chunks_than_ranks_stops_with_one_clear_error(tmp_path):
    r = train(tmp_path, "--max_iters=2", "--pipeline=True", "--chunk_size=128", ranks=2)
    assert r.returncode != 0
    assert "error: pipeline: the sequence has 1 chunks, fewer than the 2 ranks" in r.stderr
    assert not (tmp_path / "ckpt.pt").exists()


def test_pipeline_without_torchrun_says_how_to_launch(tmp_path):
    r = train(tmp_path, "--pipeline=True")
    assert r.returncode != 0 and "needs torchrun" in r.stderr and "Traceback" not in r.stderr


def rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (Linux /proc), or None while it has not started."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(child)
    return None


def test_a_sharded_run_killed_on_one_rank_stops_and_resumes_with_the_same_losses(tmp_path):
    """kill -9 of rank 1 of a dp=2 run: torchrun stops every rank at once, naming it; resumed, the losses
    are those of a run never killed."""
    args = ["--max_iters=40", "--ckpt_interval=10", "--dp=2"]
    whole = train(tmp_path / "whole", *args, ranks=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "train.py", "config/smoke.py", f"--out_dir={killed}", "--eval_interval=0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 30 and "local_rank: 1" in err and "exitcode: -9" in err
    n_logged = len((killed / "log.jsonl").read_text().splitlines())
    assert n_logged < 40, "the run finished before it could be killed"
    again = train(killed, *args, "--init_from=resume", ranks=2)
    assert again.returncode == 0, again.stderr[-3000:]
    curve = lambda d: [json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")]
    assert curve("killed") == pytest.approx(curve("whole"), rel=1e-6)


def test_ctrl_c_on_one_rank_stops_every_rank_after_the_step_with_a_checkpoint(tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd = [*launcher, "train.py", "config/smoke.py", f"--out_dir={tmp_path}", "--max_iters=100000",
           "--eval_interval=0", "--ckpt_interval=0", "--pipeline=True"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while (not log.exists() or len(log.read_text().splitlines()) < 5) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(rank_pid(proc.pid, 1), signal.SIGINT)  # only rank 1 sees it; rank 0 writes the checkpoint
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "interrupted: checkpoint at iteration" in out, err[-3000:]
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == len(log.read_text().splitlines()) >= 5


def test_a_rank_whose_peers_never_come_fails_in_one_line_naming_the_leftover_environment(monkeypatch):
    def no_peers(*args, **kwargs):  # what torch raises when the store's rendezvous times out
        raise torch.distributed.DistStoreError("Timed out after 31 seconds waiting for clients. 1/2 clients joined.")
    monkeypatch.setattr(torch.distributed, "init_process_group", no_peers)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"^rank 0 of 2 could not join the others within 32 s \(Timed out after 31 "
                                         r"seconds.*\): start every rank with torchrun, or unset RANK and WORLD_SIZE"):
        pipeline.Pipeline.from_env("cpu", timeout=1.0, dp=2)
