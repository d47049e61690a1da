"""What ran on an H200 for docs/ram.md's recall table, in 10 minutes at most.

    python scripts/recall_gpu_run.py OUT_DIR [budget_s]
    DRY=1 python scripts/recall_gpu_run.py out/dry 5     # the same steps, tiny, on a CPU: does it all work?

1. a speed probe: every method trains 40 steps at 640 tokens (about the run's mean length), all at once (as
   they will run);
2. one step budget for all: as many steps as the slowest method makes in `budget_s` seconds;
3. every method trains config/recall.py with it, all at once; a run still going at the deadline is
   interrupted (SIGINT: it checkpoints) and reported as such;
4. each finished run is evaluated at 512 and 1,024 tokens, 5 depths, 100 questions per cell.
Everything lands in OUT_DIR: logs, JSONs, heatmaps, checkpoints (summary.json says what happened).
"""
import json
import os
import signal
import subprocess
import sys
import time

if __name__ == "__main__":  # a script to run, nothing to import
    try:
        OUT = sys.argv[1]
        BUDGET = float(sys.argv[2]) if len(sys.argv) > 2 else 330.0
    except (IndexError, ValueError):
        sys.exit("error: usage: python scripts/recall_gpu_run.py OUT_DIR [budget_s]")
    if os.path.exists(os.path.join(OUT, "summary.json")):
        sys.exit(f"error: {OUT} holds an earlier run (summary.json): choose another OUT_DIR")
    T0 = time.time()
    HARD_STOP = T0 + 570  # every evaluation is over by then: the call's limit is 600 s
    RUNS = dict(
        comet=["--method=comet"],
        full=["--method=comet", "--chunk_size=0"],
        truncate=["--chunk_size=0", "--method=truncate"],
        ram=["--chunk_size=0", "--method=ram"],
        ram_alone=["--chunk_size=0", "--method=ram", "--ram_query=alone", "--encoder_layers=2"],
    )
    DRY = os.environ.get("DRY") == "1"
    SMALL = ["--batch_size=2", "--n_layer=2", "--eval_trials=5", "--threads=1"] if DRY else ["--threads=3"]
    TRIALS = 2 if DRY else 100
    EVALS = dict(ram=[("ram8x", ["--keep_ratio=0.125"]), ("ram_decoder_truncated", ["--method=truncate"])])
    summary = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), budget_s=BUDGET, runs={})
    os.makedirs(OUT, exist_ok=True)


    def note(**kw):
        summary.update(kw)
        with open(os.path.join(OUT, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


    def train(name, extra, out_dir, log):
        cmd = [sys.executable, "-m", "ram.train_ram", "config/recall.py", *RUNS[name], *extra, f"--out_dir={out_dir}", *SMALL]
        return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)


    def lines(path):
        try:
            with open(path) as f:
                return sum(1 for _ in f)
        except OSError:
            return 0


    # 1. probe
    procs, marks = {}, {}
    for name in RUNS:
        procs[name] = train(name, ["--max_iters=40", "--min_len=640", "--max_len=640", "--curriculum=0",
                                   "--eval_interval=0", "--ckpt_interval=0"],
                            f"out/probe_{name}", os.path.join(OUT, f"probe_{name}.log"))
    while any(p.poll() is None for p in procs.values()) and time.time() < T0 + 120:
        for name in RUNS:
            n = lines(f"out/probe_{name}/log.jsonl")
            for k in (10, 40):
                if n >= k and (name, k) not in marks:
                    marks[name, k] = time.time()
        time.sleep(0.2)
    rates = {}
    for name, p in procs.items():
        if p.poll() is None:
            p.kill()
        if (name, 10) in marks and (name, 40) in marks:
            rates[name] = 30 / max(1e-3, marks[name, 40] - marks[name, 10])
    steps = max(200, min(8000, int(min(rates.values()) * BUDGET) // 50 * 50)) if rates else 0
    note(probe_steps_per_s=rates, max_iters=steps, probe_s=time.time() - T0)
    print("probe:", rates, "->", steps, "steps", flush=True)
    if not steps:
        sys.exit("every probe failed: see probe_*.log")

    # 2-3. train, all at once; 4. evaluate each as soon as it is done
    deadline = min(time.time() + BUDGET * 1.3, HARD_STOP - 110)  # then SIGINT: checkpoint, stop
    procs = {n: train(n, [f"--max_iters={steps}"], f"out/recall_{n}", os.path.join(OUT, f"train_{n}.log"))
             for n in RUNS if n in rates}
    started = {n: time.time() for n in procs}
    evals, interrupted = [], set()


    def evaluate(name):
        ckpt = f"out/recall_{name}/ckpt.pt"
        for tag, extra in [(name, [])] + EVALS.get(name, []):
            cmd = [sys.executable, "-m", "ram.eval_ram", f"--ckpt={ckpt}", "--lengths=512,1024", f"--trials={TRIALS}",
                   f"--threads={1 if DRY else 3}", f"--json={OUT}/recall_{tag}.json", *extra]
            evals.append((tag, subprocess.Popen(cmd, stdout=open(os.path.join(OUT, f"eval_{tag}.log"), "w"),
                                                stderr=subprocess.STDOUT)))


    pending = dict(procs)
    while pending and time.time() < HARD_STOP - 70:
        for name, p in list(pending.items()):
            if p.poll() is not None:
                summary["runs"][name] = dict(rc=p.returncode, train_s=time.time() - started[name],
                                             steps=lines(f"out/recall_{name}/log.jsonl"), interrupted=name in interrupted)
                note()
                del pending[name]
                if os.path.exists(f"out/recall_{name}/ckpt.pt"):
                    evaluate(name)
            elif time.time() > deadline and name not in interrupted:
                p.send_signal(signal.SIGINT)  # finish the step, checkpoint, exit
                interrupted.add(name)
        time.sleep(0.5)
    for name, p in pending.items():
        p.kill()
        summary["runs"][name] = dict(rc="killed", steps=lines(f"out/recall_{name}/log.jsonl"))
    for tag, p in evals:
        try:
            p.wait(timeout=max(1, HARD_STOP - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            summary.setdefault("evals_killed", []).append(tag)
    note(total_s=time.time() - T0)
    print(json.dumps(summary, indent=1), flush=True)
