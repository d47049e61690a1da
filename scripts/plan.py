"""A memory plan for a CoMeT training run: per-GPU bytes before you rent the GPUs.

    python -m scripts.plan --model=Llama-3.1-8B --context=32768 --pp=8 --gpu_gib=80
    python -m scripts.plan --model=Llama-3.1-8B --context=131072 --freeze_base --checkpoint_activations --pp=8
    python -m scripts.plan --model=/path/to/Llama-3.2-1B --context=32768 --checkpoint_activations   # config.json or .gguf
    python -m scripts.plan --context=16384 --checkpoint_activations --measure --device=cuda   # check it on this GPU

What one GPU holds (docs/scale.md has the assumptions and their validation):
  parameters   fp32 master weights (a frozen base: bf16), sharded over the dp ranks; the pipeline's ranks
               each hold every layer (S7 splits chunks, not layers);
  gradients    fp32, of the trainable parameters, sharded over dp;
  optimizer    AdamW's two fp32 states of the trainable parameters, sharded over dp;
  activations  what backward needs of this rank's chunks: every layer's saved tensors per extended-chunk row
               (`layer_elements`), or with --checkpoint_activations only each layer-over-chunk step's inputs
               plus one step's saved tensors while it is recomputed;
  logits       the logits of this rank's tokens (with --loss_chunk: of one piece of each sequence), and their fp32
               log-softmax, its gradient and theirs in backward;
  transient    weights in the compute dtype beside the fp32 ones: with dp > 1, a block gathered and the next
               one prefetched, and the weights outside the blocks (FSDP2's root unit stays gathered); in
               one process under bf16 autocast, autocast's bf16 copy of every trainable matrix, which it
               caches for the whole forward (sharded runs gather bf16 weights instead: no casts).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from configurator import configure_or_exit, peak_memory_mib, pick_device, settings_of
from llama import freeze_base as freeze, read_config
from model import MEMORY_SETTINGS, ModelConfig, Transformer
from pipeline import Pipeline

# named shapes (the published configs; "Qwen3-4B-like": Qwen3-4B's sizes with head size n_embd / n_head)
SHAPES = {
    "Llama-3.2-1B": dict(n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, ffn_hidden=8192, vocab_size=128256,
                         tie_embeddings=True),
    "Llama-3.1-8B": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, ffn_hidden=14336, vocab_size=128256,
                         tie_embeddings=False),
    "Qwen3-4B-like": dict(n_layer=36, n_embd=2560, n_head=32, n_kv_head=8, ffn_hidden=9728, vocab_size=151936,
                          tie_embeddings=True),
    # shapes small enough to measure on a CPU (--measure)
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, ffn_hidden=320, vocab_size=259),
    "30M": dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=8, ffn_hidden=1376, vocab_size=259),
}
GIB = 2 ** 30

# -----------------------------------------------------------------------------
model = "Llama-3.2-1B"          # a name in SHAPES, a Llama checkpoint directory (config.json) or a .gguf file
context = 32768                 # tokens per sequence
batch = 1                       # sequences per dp rank
chunk_size = 2048
n_global = 64
stride = 8
temp_budget = 512
adapter_rank = 8
pp = 1                          # pipeline ranks (each takes a block of every sequence's chunks)
dp = 1                          # data-parallel ranks (FSDP2: parameters, gradients and optimizer sharded)
dtype = "bfloat16"              # compute dtype of activations: bfloat16 | float32
freeze_base = False             # train only what CoMeT adds; the base is held in bf16
checkpoint_activations = False
loss_chunk = 0                  # > 0: train.py's chunked loss, logits this many tokens of each sequence at a time
gpu_gib = 80.0                  # GPU memory to check the plan against
measure = False                 # also run training steps of this shape here and report their peak memory
device = "cpu"                  # --measure on: cpu (fp32) | cuda (in the dtype setting's autocast, as train.py) | auto
threads = 0
# -----------------------------------------------------------------------------


def layer_elements(cfg: ModelConfig, n_prefix: int, n_rows: int) -> int:
    """Elements one decoder layer (model.Block) saves for backward over one extended chunk: n_prefix memory
    rows (keys and values only, S2) in front of n_rows rows, as counted with autograd's saved-tensor hooks
    (tests/test_plan.py). Every row, 5h: the attention norm's input (prefix and rows concatenated), its
    output, the keys' and values' projection inputs, the keys and values (GQA heads repeated to n_head).
    The n_rows rows also 6h: q, attention's output, the output projection's input, the FFN norm's input and
    output, the SwiGLU's input; and 4f: w1, w3, silu(w1) and their product. (Per-row norms, attention's
    log-sum-exp and the mask are left out: under 3%.) Then the memory update of a closed chunk."""
    block = (n_prefix + n_rows) * 5 * cfg.n_embd + n_rows * (6 * cfg.n_embd + 4 * cfg.ffn_hidden)
    # S3, S4: the memory update of a closed chunk (gates, adapters, the new state and FIFO), about 2h per row
    update = 2 * (2 * cfg.n_global + cfg.temp_budget + cfg.n_compression) * cfg.n_embd
    return block + update


@dataclass
class Plan:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    transient: int
    base_params: int
    memory_params: int
    chunks_per_rank: int
    chunk_major: bool  # one process: model.forward's chunk-major order; else the pipeline's layer-major one

    @property
    def peak(self) -> int:
        """Weights and optimizer states stay. Chunk-major, backward reaches every layer in the last chunk,
        filling all the gradients while the earlier chunks' activations are still held; layer-major (the
        pipeline, dp > 1), it frees a layer's activations as that layer's gradients fill in (measured:
        `measure_step`, docs/scale.md)."""
        held = self.activations + self.logits
        return (self.parameters + self.optimizer + self.transient
                + (held + self.gradients if self.chunk_major else max(held, self.gradients)))


def model_config(name: str, settings: dict) -> ModelConfig:
    """ModelConfig of a named shape or a checkpoint (llama.read_config) with the plan's CoMeT settings."""
    comet = {k: settings[k] for k in MEMORY_SETTINGS if k in settings}
    if name in SHAPES:
        return ModelConfig(**SHAPES[name], **comet)
    if not os.path.exists(name):
        raise ValueError(f"model={name!r} is neither a shape I know ({', '.join(SHAPES)}) nor a checkpoint "
                         "directory or .gguf file")
    args, _ = read_config(name)
    return ModelConfig(**{**args, **comet})


def make_plan(cfg: ModelConfig, context: int, batch: int, pp: int, dp: int, act_bytes: int,
              freeze_base: bool, checkpoint_activations: bool, loss_chunk: int = 0) -> Plan:
    """Per-GPU bytes of one training step (see the module's docstring for what each term holds). loss_chunk:
    train.py's chunked loss, whose logits exist for loss_chunk tokens of each sequence at a time."""
    with torch.device("meta"):
        base, mem = Transformer(cfg).param_counts()  # exact counts, no memory used
    trainable = mem if freeze_base else base + mem
    n_chunks = math.ceil(context / cfg.chunk_size)
    mine = math.ceil(n_chunks / pp)
    slots = cfg.n_global + cfg.temp_budget  # the memory prefix [G; T] (S2)
    rows = cfg.chunk_size + cfg.n_compression + cfg.n_global  # the chunk's own rows [X; R]
    layer = layer_elements(cfg, slots, rows) * batch * act_bytes  # one layer over one chunk
    if checkpoint_activations:  # kept: each step's input rows and memory state (s, G, T); one step recomputed
        acts = cfg.n_layer * mine * batch * (rows + 2 * cfg.n_global + cfg.temp_budget) * cfg.n_embd * act_bytes
        acts += layer
    else:
        acts = cfg.n_layer * mine * layer
    tokens = batch * min(context, mine * cfg.chunk_size)
    outside = cfg.vocab_size * cfg.n_embd * (1 if cfg.tie_embeddings else 2)  # embeddings and output
    layer_params = (base - outside) // cfg.n_layer
    if dp > 1:  # FSDP2 with bf16 (or fp32) gathers: two blocks, and the root unit (+ the memories) kept gathered
        transient = act_bytes * (2 * layer_params + outside + mem)
    else:  # autocast's cached bf16 copies of the trainable matrices (a frozen base is held in bf16 already;
        # an untied embedding table is looked up, never cast)
        cast = mem if freeze_base else base + mem - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd)
        transient = 2 * cast if act_bytes == 2 else 0
    # the logits in the compute dtype, and three fp32 tensors of their size: the loss's log-softmax and, in
    # backward, its gradient and the logits' (under autocast the fp32 copy of the logits lives only during the
    # loss's forward; measured with bf16 autocast: tests/test_plan.py)
    logit_bytes = act_bytes + 3 * 4
    acts += 3 * tokens * cfg.n_embd * act_bytes  # the last layer's token states gathered, normed, fed to the output
    return Plan(parameters=(base * (2 if freeze_base else 4) + mem * 4) // dp, gradients=4 * trainable // dp,
                optimizer=8 * trainable // dp, activations=acts,
                logits=logit_bytes * min(tokens, batch * loss_chunk or tokens) * cfg.vocab_size,
                transient=transient, base_params=base, memory_params=mem,
                chunks_per_rank=mine, chunk_major=pp == 1 and dp == 1)


def step_runner(cfg: ModelConfig, context: int, batch: int, freeze_base: bool, checkpoint_activations: bool,
                device: str = "cpu", bf16: bool = False, pipe: Pipeline | None = None) -> Callable[[], None]:
    """A random model of this shape on `device` and one training step of it on random tokens, as train.py runs
    it: forward, loss, backward, fused AdamW; bf16: autocast over fp32 weights, a frozen base held in bf16.
    pipe: under torchrun with --dp, this rank's share of a sharded step (FSDP2, pp = 1)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    model.checkpoint_activations = checkpoint_activations
    if freeze_base:
        freeze(model, torch.bfloat16 if bf16 else None)
    if pipe is not None:
        pipe.shard(model)
    # fused, as train.py on a GPU: no foreach temporaries the size of the weights during the step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    idx = torch.randint(cfg.vocab_size, (batch, context + 1)).to(device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast:
            logits, _ = pipe.forward(model, idx[:, :-1]) if pipe is not None else model(idx[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure_step(cfg: ModelConfig, context: int, batch: int, freeze_base: bool, checkpoint_activations: bool,
                 pipe: Pipeline | None = None) -> tuple[int, int, int | None]:
    """fp32 training steps here on CPU (`step_runner`). Returns the peak resident memory before and after two
    steps (the second is what every later step looks like, the optimizer's states already there; their
    difference is the plan's peak minus its parameters, plus what the process's allocator keeps), and the peak
    of live tensors during a third, profiled step above the weights and optimizer states (the plan's peak minus
    parameters and optimizer). pipe: a sharded step (FSDP2); then no profile (None): the profiler misses the
    storages FSDP2 frees by resizing them."""
    step = step_runner(cfg, context, batch, freeze_base, checkpoint_activations, pipe=pipe)
    before = peak_memory_mib("cpu")  # this process's peak resident memory so far
    for _ in range(2):
        step()
    after = round(peak_memory_mib("cpu") * 2**20)
    if pipe is not None:
        return round(before * 2**20), after, None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return round(before * 2**20), after, live_peak(prof.events())


def measure_cuda_step(cfg: ModelConfig, context: int, batch: int, freeze_base: bool, checkpoint_activations: bool,
                      bf16: bool = True, steps: int = 3) -> tuple[int, float]:
    """Training steps on this process's GPU (`step_runner`). Returns the most bytes CUDA's allocator held over
    them, which is the plan's whole peak (from the second step on, AdamW's states are there), and the seconds of
    the last step."""
    torch.cuda.reset_peak_memory_stats()
    step = step_runner(cfg, context, batch, freeze_base, checkpoint_activations, "cuda", bf16)
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return torch.cuda.max_memory_allocated(), seconds


def live_peak(events) -> int:
    """The most bytes the profiled ops held at once beyond what was live before them: each op's own
    allocations minus frees, in the order the ops ended."""
    live = peak = 0
    for e in sorted((e for e in events if e.self_cpu_memory_usage), key=lambda e: e.time_range.end):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def advice(plan: Plan, cfg: dict) -> str:
    """What to change when the plan does not fit."""
    tips = [] if cfg["checkpoint_activations"] else ["--checkpoint_activations"]
    if plan.parameters + plan.gradients + plan.optimizer > plan.activations + plan.logits:
        tips.append(f"--dp={2 * cfg['dp']}")  # sharding shrinks the states
    else:
        tips.append(f"--pp={2 * cfg['pp']}")  # each pipeline rank keeps its own chunks' activations and logits
    if not cfg["freeze_base"]:
        tips.append("--freeze_base")
    return " or ".join(tips)


def report(plan: Plan, cfg: dict) -> str:
    """The plan as a table, and whether it fits."""
    lines = [f"{cfg['model']}: {plan.base_params / 1e9:.2f}B base + {plan.memory_params / 1e6:.1f}M memory "
             f"parameters; {cfg['context']:,} tokens x {cfg['batch']} in chunks of {cfg['chunk_size']} "
             f"({plan.chunks_per_rank} per rank); pp={cfg['pp']} x dp={cfg['dp']}, "
             f"{'frozen base' if cfg['freeze_base'] else 'full fine-tune'}, activations in {cfg['dtype']}"
             f"{', checkpointed' if cfg['checkpoint_activations'] else ''}", ""]
    for name in ("parameters", "gradients", "optimizer", "activations", "logits", "transient", "peak"):
        lines.append(f"  {name:<12} {getattr(plan, name) / GIB:9.2f} GiB")
    need, have = plan.peak / GIB, cfg["gpu_gib"]
    lines.append("")
    lines.append(f"fits: {need:.1f} GiB per GPU of {have:g}" if need <= have else
                 f"does not fit: needs {need:.1f} GiB per GPU, you have {have:g}: try {advice(plan, cfg)}")
    return "\n".join(lines)


def measure_here(mc: ModelConfig, cfg: dict) -> None:
    """--measure: run this shape's training steps here and print their peak memory beside the plan's. CPU: fp32,
    with dp > 1 under torchrun (FSDP2, pp = 1); CUDA: one process, in the dtype setting's autocast."""
    if cfg["device"].startswith("cuda"):
        plan = make_plan(mc, cfg["context"], cfg["batch"], 1, 1, 2 if cfg["dtype"] == "bfloat16" else 4,
                         cfg["freeze_base"], cfg["checkpoint_activations"])
        gpu = f"{torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / GIB:.1f} GiB"
        try:
            peak, seconds = measure_cuda_step(mc, cfg["context"], cfg["batch"], cfg["freeze_base"],
                                              cfg["checkpoint_activations"], bf16=cfg["dtype"] == "bfloat16")
        except torch.cuda.OutOfMemoryError:
            raise SystemExit(f"measured on {gpu}: out of memory; the plan says {plan.peak / GIB:.2f} GiB")
        print(f"measured on {gpu}: three steps (pp=1, dp=1) peaked at {peak / GIB:.2f} GiB allocated, the plan "
              f"says {plan.peak / GIB:.2f} ({plan.peak / peak - 1:+.1%}); the last step took {seconds:.2f} s")
        return
    plan = make_plan(mc, cfg["context"], cfg["batch"], 1, cfg["dp"], 4, cfg["freeze_base"],
                     cfg["checkpoint_activations"])  # (main refuses --measure with --loss_chunk)
    try:
        pipe = Pipeline.from_env("cpu", dp=cfg["dp"], threads=cfg["threads"]) if cfg["dp"] > 1 else None
    except ValueError as e:
        raise SystemExit(f"error: --measure with --dp={cfg['dp']} runs under torchrun "
                         f"(torchrun --nproc_per_node={cfg['dp']} -m scripts.plan ...): {e}")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if plan.peak > 0.8 * ram:  # the kernel would kill the step midway, or the machine would swap for hours
        raise SystemExit(f"error: --measure: the plan says {plan.peak / GIB:.1f} GiB, this machine has "
                         f"{ram / GIB:.1f} GiB of memory: measure a smaller --model or --context")
    before, after, live = measure_step(mc, cfg["context"], cfg["batch"], cfg["freeze_base"],
                                       cfg["checkpoint_activations"], pipe)
    tensors = "" if live is None else (f"a step's live tensors peaked {live / GIB:.3f} GiB above the weights "
                                       f"and AdamW states, the plan says "
                                       f"{(plan.peak - plan.parameters - plan.optimizer) / GIB:.3f}; ")
    print(f"measured here (CPU, fp32, pp=1, dp={cfg['dp']}, rank {pipe.dp_rank if pipe else 0}): {tensors}"
          f"two steps added {(after - before) / GIB:.3f} GiB to the peak resident memory (AdamW states and "
          f"the allocator's own included), the plan says {(plan.peak - plan.parameters) / GIB:.3f} (peak - "
          "parameters)")


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    try:
        if cfg["chunk_size"] <= 0:  # the other numbers: configurator.RULES
            raise ValueError(f"chunk_size={cfg['chunk_size']} must be > 0")
        if cfg["dtype"] not in ("bfloat16", "float32"):
            raise ValueError(f"dtype={cfg['dtype']!r} must be bfloat16 or float32")
        if math.ceil(cfg["context"] / cfg["chunk_size"]) < cfg["pp"]:
            raise ValueError(f"{math.ceil(cfg['context'] / cfg['chunk_size'])} chunks cannot split over pp="
                             f"{cfg['pp']} ranks: lower pp or chunk_size")
        dev = pick_device(cfg["device"]) if cfg["measure"] else cfg["device"]  # a plan alone needs no device
        if cfg["loss_chunk"] and (cfg["pp"] > 1 or cfg["dp"] > 1):
            raise ValueError("loss_chunk works in one process (as in train.py): drop it or --pp/--dp")
        if cfg["measure"] and cfg["loss_chunk"]:  # its steps compute the whole logits, as a plain train.py step
            raise ValueError("--measure runs steps with the whole logits: drop --loss_chunk to compare them")
        if cfg["measure"] and dev.startswith("cuda") and cfg["dp"] > 1:
            raise ValueError("--measure --device=cuda runs one process: drop --dp")
        mc = model_config(cfg["model"], cfg)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}")
    act_bytes = 2 if cfg["dtype"] == "bfloat16" else 4
    plan = make_plan(mc, cfg["context"], cfg["batch"], cfg["pp"], cfg["dp"], act_bytes, cfg["freeze_base"],
                     cfg["checkpoint_activations"], cfg["loss_chunk"])
    print(report(plan, cfg))
    if cfg["measure"]:
        measure_here(mc, {**cfg, "device": dev})
    if plan.peak > cfg["gpu_gib"] * GIB:
        raise SystemExit(1)  # scripts can ask: does it fit?


if __name__ == "__main__":
    main()
