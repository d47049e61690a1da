"""The pipeline's schedules (docs/design.md, S7) on paper and on this CPU: an ideal-time simulator, and a measurement
of P local gloo ranks (`launch`) next to one process and to the simulator.

    python -m scripts.pipeline_sim --simulate --layers 28 --ranks 8 --layer_ms 12 --message_ms 0.5
    python -m scripts.pipeline_sim --measure --ranks 2      # CPU, one thread per rank, next to the simulator
"""
from __future__ import annotations

import argparse
import math
import pickle
import queue
import time
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import ModelConfig, Transformer
from pipeline import Pipeline, PipelineError


# --- local launcher: P CPU processes over gloo, one thread each (this script's --measure, and the tests) ------

class RankResult(NamedTuple):
    code: int | None  # exit code; None: still running at the deadline (then killed)
    status: str       # "ok", "error" (a PipelineError) or "died" (no report)
    value: object     # fn's result, or the error message
    seconds: float    # from joining the process group to the report


def _rank_main(rank: int, world: int, port: int, timeout: float, schedule: str, fn, args, results, dp: int) -> None:
    torch.set_num_threads(1)  # one core per rank: oversubscribed cores make gloo runs crawl
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=timeout))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    t0 = time.monotonic()
    try:  # plain pickle: tensors by value (the queue's own pickler shares memory with a rank about to exit)
        value = fn(Pipeline(schedule, timeout, dp=dp), *args)
        results.put((rank, "ok", pickle.dumps(value), time.monotonic() - t0))
    except PipelineError as e:
        results.put((rank, "error", pickle.dumps(str(e)), time.monotonic() - t0))
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def launch(fn, world: int, *args, schedule: str = "wavefront", timeout: float = 30.0,
           deadline: float | None = None, dp: int = 1) -> list[RankResult]:
    """Run fn(pipe, *args) on `world` local gloo processes (fn must be importable: spawn pickles it by
    name), as world / dp pipelines of dp-sharded ranks (`Pipeline`). Ranks still running `deadline` seconds
    after the start, or a timeout after another rank reported an error, are killed. One result per rank."""
    ctx = mp.get_context("spawn")
    # the rendezvous store lives here, on a port the OS picks (port 0: no collisions between runs)
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, store.port, timeout, schedule, fn, args, results, dp))
             for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, tuple] = {}
    end = time.monotonic() + (deadline if deadline is not None else 10 * timeout + 60)
    while len(out) < world and time.monotonic() < end and any(p.is_alive() for p in procs):
        try:
            rank, status, value, seconds = results.get(timeout=0.1)
            out[rank] = status, pickle.loads(value), seconds
            if status == "error":  # the others have one timeout to report too
                end = min(end, time.monotonic() + timeout + 5)
        except queue.Empty:
            pass
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    while not results.empty():  # anything that arrived after the last poll
        rank, status, value, seconds = results.get()
        out[rank] = status, pickle.loads(value), seconds
    return [RankResult(codes[r], *out.get(r, ("died", None, math.nan))) for r in range(world)]



# --- schedule simulator ------------------------------------------------------------------------------

def simulate(layers: int, ranks: int, layer_time: float, message_time: float, backward_ratio: float = 2.0,
             schedule: str = "wavefront") -> tuple[float, float]:
    """Ideal step time (forward + backward) of one sequence and the utilisation (busy / (ranks x time)).
    layer_time: one layer over one rank's chunks, forward; message_time: one layer's memories between
    neighbours. Naive: a rank starts once the previous one has sent all of its layers."""
    def sweep(t: float, start: list[float], order: range) -> list[float]:
        done = [0.0] * ranks  # when each rank finished its last layer so far
        prev_done = [[0.0] * layers for _ in range(ranks)]
        for i, r in enumerate(order):
            clock = start[r]
            for l in range(layers):
                if i and schedule == "wavefront":
                    clock = max(clock, prev_done[order[i - 1]][l] + message_time)
                elif i and l == 0:  # naive: all of the previous rank's layers, then all their messages
                    clock = max(clock, done[order[i - 1]] + layers * message_time)
                clock += t
                prev_done[r][l] = clock
            done[r] = clock
        return done

    fwd = sweep(layer_time, [0.0] * ranks, range(ranks))
    total = max(sweep(backward_ratio * layer_time, fwd, range(ranks - 1, -1, -1)))
    busy = layers * layer_time * (1 + backward_ratio)
    return total, busy / total


def _timed_steps(pipe: Pipeline, cfg, batch: int, n_tokens: int, steps: int) -> dict:
    """--measure, on every rank: the wall time of `steps` pipelined forward+backward steps."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(cfg.vocab_size, (batch, n_tokens))
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        dist.barrier()
        pipe.wait_s, t0 = 0.0, time.perf_counter()
        logits, span = pipe.forward(model, idx)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, span].flatten(), reduction="sum")
        (loss / idx.numel()).backward()
        pipe.all_reduce(model, loss / idx.numel())
        model.zero_grad(set_to_none=True)
        times.append((time.perf_counter() - t0, pipe.wait_s))
    step_s, wait_s = min(times[1:])  # the fastest step, and how long this rank waited in it
    return dict(step_s=step_s, wait_s=wait_s)


def _measure(args) -> None:
    cfg = ModelConfig(vocab_size=259, n_layer=args.layers, ffn_hidden=320)  # train.py's default model
    n_tokens = args.chunks * cfg.chunk_size
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(cfg.vocab_size, (args.batch, n_tokens))
    fwd, bwd = [], []
    for _ in range(args.steps + 1):
        t0 = time.perf_counter()
        _, loss = model(idx, idx)
        t1 = time.perf_counter()
        loss.backward()
        fwd.append(t1 - t0)
        bwd.append(time.perf_counter() - t1)
        model.zero_grad(set_to_none=True)
    t_fwd, t_bwd = min(fwd[1:]), min(bwd[1:])
    layer_s = t_fwd / (cfg.n_layer * args.ranks)  # one layer over one rank's share of the chunks
    print(f"one process, 1 thread: {n_tokens} tokens x batch {args.batch}, {cfg.n_layer} layers: "
          f"forward {t_fwd * 1e3:.0f} ms + backward {t_bwd * 1e3:.0f} ms = {(t_fwd + t_bwd) * 1e3:.0f} ms")
    for schedule in ("naive", "wavefront"):
        res = launch(_timed_steps, args.ranks, cfg, args.batch, n_tokens, args.steps, schedule=schedule)
        if any(r.status != "ok" for r in res):
            raise SystemExit(f"error: {[r.value for r in res if r.status != 'ok']}")
        step = max(r.value["step_s"] for r in res)
        busy = sum(1 - r.value["wait_s"] / r.value["step_s"] for r in res) / len(res)
        sim_t, sim_u = simulate(cfg.n_layer, args.ranks, layer_s, args.message_ms / 1e3, t_bwd / t_fwd, schedule)
        print(f"{schedule:>9}: measured step {step * 1e3:.0f} ms, utilisation {busy:.0%} (time not waiting "
              f"for a peer), {(t_fwd + t_bwd) / step:.2f}x one process | simulated step {sim_t * 1e3:.0f} ms, "
              f"utilisation {sim_u:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--simulate", action="store_true", help="print the ideal step time of both schedules")
    ap.add_argument("--measure", action="store_true", help="time P local CPU ranks against one process")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layer_ms", type=float, default=10.0, help="forward of one layer over one rank's chunks")
    ap.add_argument("--message_ms", type=float, default=0.1, help="one layer's memories to the next rank")
    ap.add_argument("--backward_ratio", type=float, default=2.0, help="backward time / forward time")
    ap.add_argument("--batch", type=int, default=8, help="--measure: sequences per step")
    ap.add_argument("--chunks", type=int, default=16, help="--measure: chunks per sequence")
    ap.add_argument("--steps", type=int, default=5, help="--measure: timed steps (the fastest is kept)")
    args = ap.parse_args()
    if args.layers < 1 or args.ranks < 1 or args.layer_ms < 0 or args.message_ms < 0:
        ap.error("--layers and --ranks must be >= 1, times >= 0")
    if args.measure:
        return _measure(args)
    if not args.simulate:
        ap.error("say --simulate or --measure")
    print(f"{args.layers} layers, {args.ranks} ranks, {args.layer_ms:g} ms per layer forward, backward "
          f"x{args.backward_ratio:g}, {args.message_ms:g} ms per message")
    naive_t, _ = simulate(args.layers, args.ranks, args.layer_ms, args.message_ms, args.backward_ratio, "naive")
    for schedule in ("naive", "wavefront"):
        t, u = simulate(args.layers, args.ranks, args.layer_ms, args.message_ms, args.backward_ratio, schedule)
        print(f"{schedule:>9}: step {t:9.1f} ms   utilisation {u:6.1%}   speedup over naive {naive_t / t:5.2f}x")
    print(f"ideal wavefront utilisation L/(L+P-1) = {args.layers / (args.layers + args.ranks - 1):.1%}")


if __name__ == "__main__":
    main()
