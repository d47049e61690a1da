"""Layer-level pipeline parallelism for CoMeT training on long sequences (docs/design.md, S7).

One sequence is split by chunks across P ranks: rank r owns a contiguous block of chunks and a full
copy of the weights. For every layer l, rank r receives layer l's memories from rank r-1, runs layer
l over its chunks (the same `Transformer.layer_step` that streaming uses, here looped layer-major),
and sends the updated memories on to rank r+1. So while rank r+1 runs layer l, rank r already runs
layer l+1: a wavefront with ideal utilisation L / (L + P - 1). Sending and receiving are autograd
functions, so backward runs the same wavefront in reverse; weight gradients are then all-reduced.

    torchrun --standalone --nproc_per_node=2 train.py config/smoke.py --pipeline=True
    python -m scripts.pipeline_sim --simulate --layers 28 --ranks 8   # the schedules on paper; --measure: CPU

With dp > 1 (`--dp`) the ranks form a (pp, dp) DeviceMesh: world / dp pipelines, each reading its own
slice of every batch, their weights, gradients and AdamW states sharded across "dp" by FSDP2
(`Pipeline.shard`); the pipeline's gradient all-reduce then runs over "pp" only (docs/scale.md).

Only torch.distributed moves data (gloo on CPU, NCCL on CUDA); every wait has a timeout, so a rank
that dies, raises or hangs stops the others within it, with a message naming the rank and layer.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from memory import MemoryState
from model import Transformer, bptt_cut, chunk_closed, chunk_spans


def pipeline_size(world: int, dp: int) -> int:
    """pp, the ranks of one pipeline, for `world` processes in a (pp, dp) grid; one clear error otherwise."""
    if dp < 1 or world % dp:
        raise ValueError(f"{world} processes cannot form pp x dp with dp={dp}: the world size must be a multiple "
                         "of dp (pp = world size / dp)")
    return world // dp


def rank_chunks(n_chunks: int, rank: int, world: int) -> range:
    """The contiguous block of chunk indices rank `rank` owns; blocks differ in size by at most one."""
    if n_chunks < world:
        raise ValueError(f"pipeline: the sequence has {n_chunks} chunks, fewer than the {world} ranks; "
                         "use longer sequences or fewer ranks")
    return range(rank * n_chunks // world, (rank + 1) * n_chunks // world)


SCHEDULES = ("wavefront", "naive")


class PipelineError(RuntimeError):
    """A peer died, raised or hung: raised on every rank that waits for it."""


# --- transport: every send/receive is an autograd function, every wait has a timeout ---------------

class _Send(torch.autograd.Function):
    """Forward: send x to the next rank. Backward: receive dLoss/dx from it. The returned zero is
    added to this rank's outputs, so that backward reaches this node."""

    @staticmethod
    def forward(ctx, x: Tensor, pipe: Pipeline, layer: int) -> Tensor:
        ctx.pipe, ctx.layer, ctx.shape, ctx.dtype = pipe, layer, x.shape, x.dtype
        pipe._send(x.detach(), pipe.rank + 1, layer, "send layer-{l} memories to rank {p}")
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grad = ctx.pipe._receive(ctx.shape, ctx.dtype, ctx.pipe.rank + 1, ctx.layer,
                                 "receive the gradient of its layer-{l} memories from rank {p}")
        return grad, None, None


class _Recv(torch.autograd.Function):
    """Forward: receive a tensor from the previous rank. Backward: send dLoss/d(it) back to it.
    `anchor` is an empty tensor that requires grad, so the result is part of the graph."""

    @staticmethod
    def forward(ctx, anchor: Tensor, pipe: Pipeline, layer: int, shape: tuple[int, ...]) -> Tensor:
        ctx.pipe, ctx.layer = pipe, layer
        return pipe._receive(shape, anchor.dtype, pipe.rank - 1, layer, "receive layer-{l} memories from rank {p}")

    @staticmethod
    def backward(ctx, grad: Tensor):
        pipe = ctx.pipe
        pipe._send(grad, pipe.rank - 1, ctx.layer, "send the gradient of layer-{l} memories to rank {p}")
        return None, None, None, None


# FSDP2 warns when a sharded block returns a view: ours returns its keys/values as views, which nothing
# changes in place, so the warning (once per rank and block) says nothing about this code
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


class Pipeline:
    """This process's place in the pipeline (rank, world, schedule, timeout) and its sends in flight.
    Created after `dist.init_process_group`; see `from_env` (and scripts/pipeline_sim.py's `launch`).
    NOTE: messages carry no tags: between two ranks they match in the order they were posted, which is
    what NCCL requires, so the gloo tests check that both sides post in the same order."""

    def __init__(self, schedule: str = "wavefront", timeout: float = 60.0, device: str = "cpu", dp: int = 1):
        if schedule not in SCHEDULES:
            raise ValueError(f"pipeline schedule {schedule!r} must be 'wavefront' or 'naive'")
        world = dist.get_world_size()
        pp = pipeline_size(world, dp)
        self.dp, self.mesh, self.groups, self.root = dp, None, (None, None), None  # groups (pp, dp); None: all
        self.rank, self.world, self.peers = dist.get_rank(), world, list(range(world))
        if dp > 1:  # a (pp, dp) grid: a sequence's chunks split along "pp", sequences and shards along "dp"
            self.mesh = init_device_mesh(torch.device(device).type, (pp, dp), mesh_dim_names=("pp", "dp"))
            self.rank, self.world = self.mesh.get_local_rank("pp"), pp  # this rank's place in its pipeline
            self.peers = self.mesh["pp"].mesh.tolist()  # the global ranks of this pipeline, by place
            self.groups = self.mesh.get_group("pp"), self.mesh.get_group("dp")
        self.schedule, self.timeout, self.device = schedule, timeout, device
        self.pending: list = []  # sends in flight (work, buffer, what, peer, layer), finished by `all_reduce`
        self.wait_s = 0.0  # time this rank spent blocked on a peer (for utilisation)

    @staticmethod
    def from_env(device: str, schedule: str = "wavefront", timeout: float = 60.0, min_chunks: int | None = None,
                 threads: int = 0, dp: int = 1) -> Pipeline:
        """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...) as world / dp
        pipelines of dp sharded ranks; one clear ValueError without torchrun, for a world size that is no
        multiple of dp, or if a sequence of `min_chunks` chunks cannot split over a pipeline's ranks.
        On CPU, one thread per rank unless `threads` says otherwise."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError("pipeline=True or dp > 1 needs torchrun, e.g. "
                             "torchrun --standalone --nproc_per_node=2 train.py ... --pipeline=True")
        pp = pipeline_size(int(os.environ["WORLD_SIZE"]), dp)
        if min_chunks is not None:
            rank_chunks(min_chunks, 0, pp)
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
            torch.cuda.set_device(device)
        # the group's own timeout is longer, so that our waits (with their messages) expire first;
        # NOTE: the NCCL path's timeouts and messages are untested here (the tests run on CPUs)
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=2 * timeout + 30))
        except (RuntimeError, ValueError) as e:  # torch's DistError and its store's timeouts are RuntimeErrors
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ValueError(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not join the others "
                             f"within {2 * timeout + 30:g} s ({why}): start every rank with torchrun, or unset RANK "
                             "and WORLD_SIZE left over from one") from None
        if not cuda and not threads:
            torch.set_num_threads(1)  # one core per rank: oversubscribed cores slow gloo runs badly
        return Pipeline(schedule, timeout, device, dp)

    def _fail(self, what: str, peer: int, layer: int | None, err: Exception | None) -> PipelineError:
        # gloo's text is "[file.cc:553] Connection closed by peer [ip]:port. This is typically ...": keep the fact
        fact = re.sub(r"^\[[^\]]*\]\s*", "", str(err or "").strip()).split(". ")[0].splitlines()
        why = f" ({fact[0][:160]})" if fact and fact[0] else ""
        who = f"rank {self.peers[peer]}" if peer >= 0 else "another rank"  # global ranks, as torchrun names them
        return PipelineError(f"pipeline rank {dist.get_rank()}: {what.format(l=layer, p=self.peers[peer])} failed "
                             f"(timeout {self.timeout:g}s){why}; {who} died, raised or is stuck, so every rank stops")

    def _wait(self, work, what: str, peer: int, layer: int | None, timeout: float | None = None) -> None:
        t0 = time.perf_counter()
        try:
            ok = work.wait(timedelta(seconds=timeout or self.timeout))
        except Exception as e:  # gloo: timeout or connection closed by a dead peer
            raise self._fail(what, peer, layer, e) from None
        if ok is False:
            raise self._fail(what, peer, layer, None)
        self.wait_s += time.perf_counter() - t0

    def _post(self, op, buf: Tensor, peer: int, layer: int, what: str):
        try:  # gloo: a dead peer may fail the call itself
            return op(buf, self.peers[peer])  # peer: a place in this pipeline
        except Exception as e:
            raise self._fail(what, peer, layer, e) from None

    def _send(self, buf: Tensor, peer: int, layer: int, what: str) -> None:
        """Start sending; `finish_sends` waits for it (and keeps the buffer alive until then)."""
        buf = buf.contiguous()
        self.pending.append((self._post(dist.isend, buf, peer, layer, what), buf, what, peer, layer))

    def _receive(self, shape, dtype, peer: int, layer: int, what: str) -> Tensor:
        buf = torch.empty(shape, device=self.device, dtype=dtype)
        self._wait(self._post(dist.irecv, buf, peer, layer, what), what, peer, layer)
        return buf

    def finish_sends(self) -> None:
        for work, _, what, peer, layer in self.pending:
            self._wait(work, what, peer, layer)
        self.pending.clear()

    def send_memory(self, mem: MemoryState, layer: int, dtype: torch.dtype) -> Tensor | None:
        """Layer `layer`'s memories after this rank's last chunk, to the next rank. Returns a zero that
        the caller adds to its outputs (backward then receives the memories' gradient), or None."""
        packed = mem.pack().to(dtype)  # (B, 2*n_global + n_temp, C)
        if packed.numel():  # no memories at all (n_global = temp_budget = 0): nothing to say
            return _Send.apply(packed, self, layer)
        return None

    def recv_memory(self, layer: int, shape: tuple[int, int, int], n_global: int, dtype: torch.dtype) -> MemoryState:
        """Layer `layer`'s memories before this rank's first chunk, from the previous rank."""
        if shape[1] == 0:
            return MemoryState.unpack(torch.zeros(shape, device=self.device, dtype=dtype), 0)
        anchor = torch.empty(0, device=self.device, dtype=dtype, requires_grad=torch.is_grad_enabled())
        return MemoryState.unpack(_Recv.apply(anchor, self, layer, shape), n_global)

    # --- one training step: forward, then backward + all-reduce ----------------------------------------

    def forward(self, model: Transformer, idx: Tensor, bptt_chunks: int = 0, align: str = "left"
                ) -> tuple[Tensor, slice]:
        """S7: idx (B, N) is the whole sequence (every rank of this pipeline gets it). Returns the logits of
        this rank's tokens (B, n, V) and which tokens they are (idx[:, span]). Same maths as `model(idx)`;
        then `loss.backward()` runs the wavefront in reverse and `all_reduce` sums the weight gradients.
        Sharded (dp > 1): through FSDP2's root unit, which gathers the weights outside the blocks."""
        if self.root is not None:
            return self.root(idx, bptt_chunks, align)
        return self.wavefront(model, idx, bptt_chunks, align)

    def wavefront(self, model: Transformer, idx: Tensor, bptt_chunks: int = 0, align: str = "left"
                  ) -> tuple[Tensor, slice]:
        """`forward`'s work: this rank's chunks, layer by layer, memories received and sent on."""
        cfg, B, N = model.config, idx.size(0), idx.size(1)
        if not cfg.comet:
            raise ValueError("the pipeline splits a sequence by chunks: it needs chunk_size > 0")
        spans = chunk_spans(N, cfg.chunk_size, align)
        mine = rank_chunks(len(spans), self.rank, self.world)
        chunks = [idx[:, spans[c].start:spans[c].stop] for c in mine]
        # S2: chunk c's prefix is its memory, of a size known without data (the FIFO may still be filling)
        layouts = [model.layout(x.size(1), chunk_closed(spans, c, cfg.chunk_size),
                                sum(cfg.memory_slots(c, len(spans[0])))) for c, x in zip(mine, chunks)]
        hs = [model.embed_chunk(x, lay) for x, lay in zip(chunks, layouts)]  # (B, L_chunk, C) each
        n_g, n_t = cfg.memory_slots(mine.start, len(spans[0]))
        shape = (B, 2 * n_g + n_t, cfg.n_embd)
        wire = max((p.dtype for p in model.parameters() if p.is_floating_point()),  # fp32 if any is:
                   key=lambda d: torch.finfo(d).bits)
        # what memories travel as (every rank has the same; a bf16 frozen base keeps fp32 memories)
        first, last = self.rank == 0, self.rank == self.world - 1
        # naive context parallelism: wait for every layer's memories up front, send all at the end
        naive = self.schedule == "naive"
        incoming = [self.recv_memory(l, shape, n_g, wire) for l in range(cfg.n_layer)] if naive and not first else None
        outgoing, sent = [], []
        for l in range(cfg.n_layer):  # layer-major: the wavefront
            if first:
                mem = MemoryState.empty(B, cfg.n_embd, idx.device, hs[0].dtype)
            else:
                mem = incoming[l] if naive else self.recv_memory(l, shape, n_g, wire)
            for i, (c, lay) in enumerate(zip(mine, layouts)):
                if bptt_cut(c, bptt_chunks):
                    mem = mem.detach()  # truncated BPTT, exactly where model.forward cuts
                hs[i], _, mem = model.layer_step(l, hs[i], mem, lay)
            if not last:
                if bptt_cut(mine.stop, bptt_chunks):
                    mem = mem.detach()  # the receiver cuts here: no gradient will come back
                if naive:
                    outgoing.append((mem, l))
                else:
                    sent.append(self.send_memory(mem, l, wire))
        sent += [self.send_memory(mem, l, wire) for mem, l in outgoing]
        h = torch.cat([h[:, lay.tokens] for h, lay in zip(hs, layouts)], 1)  # (B, n, C) real tokens only
        h = h + sum(z for z in sent if z is not None)  # + 0: ties the sends into the graph for backward
        return model.output(model.norm(h)), slice(spans[mine.start].start, spans[mine.stop - 1].stop)

    def shard(self, model: Transformer, param_dtype: torch.dtype | None = None) -> None:
        """FSDP2 over "dp" (dp > 1): every decoder block and then the rest sharded across the dp ranks, which
        gather a block's weights to run it and reduce-scatter (average) its gradients; a no-op for dp = 1.
        param_dtype (bf16 training): weights gathered in it, gradients reduced in fp32, fp32 master weights
        (and no autocast copies of the gathered weights). Call it before building the optimizer (the
        parameters become DTensors)."""
        if self.mesh is not None:
            # inputs are not cast: the residual stream, memories and RoPE angles stay as autocast keeps them
            mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                      cast_forward_inputs=False)
            for block in model.layers:
                fully_shard(block, mesh=self.mesh["dp"], mp_policy=mp)
            self.root = _Root(model, self)  # the weights outside the blocks, gathered around `forward`
            fully_shard(self.root, mesh=self.mesh["dp"], mp_policy=mp)

    @property
    def dp_rank(self) -> int:
        """Which slice of every batch this rank reads (its place along "dp")."""
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0

    @contextlib.contextmanager
    def gathered(self):
        """The weights outside the blocks gathered whole (dp > 1), for code that runs the model outside the
        pipeline's forward, e.g. the evaluation's streaming; every dp rank must run the same code."""
        if self.root is None:
            yield
            return
        self.root.unshard()
        try:
            yield
        finally:
            self.root.reshard()

    def all_reduce(self, model: Transformer, loss: Tensor, flag: float = 0.0) -> tuple[float, float]:
        """After `loss.backward()`: one all-reduce (sum) over this pipeline's ranks of the trainable weights'
        gradients (with dp > 1: this rank's shards, already averaged over dp by FSDP), of the loss and of
        `flag` (e.g. 'stop requested'); with dp > 1 then the loss averaged and the flags summed over dp.
        `loss` must be this rank's share of its pipeline's loss (its tokens' sum / the batch's count).
        Returns (total loss, sum of flags)."""
        self.finish_sends()
        params = [p for p in model.parameters() if p.requires_grad]
        local = [None if p.grad is None else p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in params]
        parts = [g.flatten() if g is not None else torch.zeros(_local_numel(p), device=self.device) for g, p in
                 zip(local, params)]
        has = torch.tensor([g is not None for g in local], dtype=parts[0].dtype, device=parts[0].device)
        extra = torch.stack([loss.detach().to(has), has.new_tensor(flag)])
        flat = torch.cat([*parts, has, extra])
        self._wait(dist.all_reduce(flat, group=self.groups[0], async_op=True),
                   "all-reduce the gradients with every rank", peer=-1, layer=None)
        grads = flat[:-2 - len(params)].split([len(x) for x in parts])
        for p, g, n, mine in zip(params, grads, flat[-2 - len(params):-2], local):
            if n == 0:
                p.grad = None  # unused on every rank: None, as in one process
            elif mine is not None and mine is not p.grad:
                mine.copy_(g.view_as(mine))  # a DTensor's local shard
            elif isinstance(p, DTensor):  # sharded, unused here (e.g. a last rank's chunk never closes)
                p.grad = DTensor.from_local(g.view(p.to_local().shape).to(p.dtype), p.device_mesh, p.placements,
                                            run_check=False, shape=p.shape, stride=p.stride())  # uneven shards
            else:
                p.grad = g.view_as(p).to(p.dtype)
        loss_flag = flat[-2:]
        if self.dp > 1:  # the dp ranks read different sequences: their losses average, their flags add up
            self._wait(dist.all_reduce(loss_flag, group=self.groups[1], async_op=True),
                       "all-reduce the loss with every rank", peer=-1, layer=None)
            loss_flag = loss_flag / loss_flag.new_tensor([self.dp, 1])
        return loss_flag[0].item(), loss_flag[1].item()

    def barrier(self, what: str, timeout: float) -> None:
        """Wait (up to `timeout` s) until every rank gets here, e.g. while rank 0 writes a checkpoint."""
        self._wait(dist.barrier(async_op=True), what, peer=-1, layer=None, timeout=timeout)

    def broadcast_parameters(self, model: Transformer) -> None:
        """Make every rank start from rank 0's weights (one message)."""
        params = list(model.parameters())
        flat = torch.cat([p.detach().flatten() for p in params])
        self._wait(dist.broadcast(flat, 0, async_op=True), "receive the weights from rank 0", peer=0, layer=None)
        with torch.no_grad():
            for p, v in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(v.view_as(p))


class _Root(nn.Module):
    """FSDP2's root unit over a model whose blocks are sharded units of their own: calling it gathers the
    embeddings, norms, output and memories, and runs the pipeline's forward (the model's own `forward` is
    not what the pipeline runs)."""

    def __init__(self, model: Transformer, pipe: Pipeline):
        super().__init__()
        self.model, self.run = model, pipe.wavefront

    def forward(self, idx: Tensor, bptt_chunks: int, align: str) -> tuple[Tensor, slice]:
        return self.run(self.model, idx, bptt_chunks, align)


def _local_numel(p: Tensor) -> int:
    """Elements of this rank's part of a parameter (a DTensor's shard, or the whole tensor)."""
    return p.to_local().numel() if isinstance(p, DTensor) else p.numel()


def reduce_step(pipe: Pipeline | None, model: Transformer, loss: Tensor, stop: bool) -> tuple[float, bool]:
    """After backward: (the loss, whether to stop). One process: as they are. A pipeline: gradients, loss
    shares and stop requests summed over the ranks, so that every rank stops after the same step."""
    if pipe is None:
        return loss.item(), stop
    total, stops = pipe.all_reduce(model, loss, flag=float(stop))
    return total, stops > 0


def join(device: str, schedule: str, timeout: float, min_chunks: int, threads: int, dp: int, pipeline: bool
         ) -> Pipeline:
    """train.py under torchrun: this process's place in the (pp, dp) grid (`from_env`); without pipeline=True
    every process must be a dp rank."""
    pipe = Pipeline.from_env(device, schedule, timeout, min_chunks, threads, dp)
    if not pipeline and pipe.world > 1:
        raise ValueError(f"{pipe.world * dp} processes, dp={dp}: without pipeline=True every process is a dp rank "
                         f"(--dp={pipe.world * dp}); or split sequences too with --pipeline=True")
    return pipe


# --- one process on a CPU: a batch's rows in slices, on threads ----------------------------------------------

def cpu_slices(wanted: int, device: str, precision: torch.dtype, compiled: bool) -> int:
    """How many slices `sliced_backward` cuts a batch into: `wanted` in one fp32 process on CPU without
    torch.compile (compiling from several threads at once is not safe), at most one per torch thread; the slices'
    threads then share those threads (intra-op threads divided among them). Else 1."""
    if torch.device(device).type != "cpu" or precision != torch.float32 or compiled:
        return 1
    slices = min(wanted, torch.get_num_threads())
    torch.set_num_threads(max(1, torch.get_num_threads() // slices))
    return slices


@functools.cache
def _thread_pool(n: int) -> ThreadPoolExecutor:
    """The threads that run a batch's slices, started once and kept."""
    return ThreadPoolExecutor(n, thread_name_prefix="batch-slice")


def sliced_backward(loss: Callable[[slice], Tensor], rows: int, slices: int, params: list[Tensor]) -> Tensor:
    """Forward and backward of a batch of `rows` rows in `slices` slices, each on its own thread; loss(rows): the
    slice's share of the batch's loss. The gradients are added up in slice order (a run stays deterministic) into
    each parameter's .grad (None where no slice reaches it, as backward() leaves it). fp32 only: autocast is per
    thread. Returns the batch's loss."""
    bounds = [rows * i // slices for i in range(slices + 1)]

    def one(part: slice) -> tuple[Tensor, tuple]:
        value = loss(part)
        return value.detach(), torch.autograd.grad(value, params, allow_unused=True)

    done = list(_thread_pool(slices).map(one, [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]))
    for i, p in enumerate(params):
        grads = [g[i] for _, g in done if g[i] is not None]
        p.grad = functools.reduce(torch.add, grads) if grads else None
    return functools.reduce(torch.add, [value for value, _ in done])
