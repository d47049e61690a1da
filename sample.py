"""Stream a prompt of any length through the memories (S6), then generate; and what every inference script
shares: opening a model (a checkpoint of ours, or a Llama) and the plain decoder's length limit.

    python sample.py --prompt="What is the pass key? The pass key is" --max_new_tokens=20
    python sample.py --prompt_file=book.txt --temperature=0.8 --top_k=40
    python sample.py --init_from=/path/to/Llama-3.2-1B --prompt="The capital of France is"
    python sample.py --init_from=model.gguf --chunk_size=512 --prompt_file=book.txt   # llama.cpp's format
    python sample.py --ckpt=docs/smollm2/memories.safetensors --prompt_file=essay.txt  # trained memories on SmolLM2
    python sample.py --prompt_file=book.txt --save_state=out/book.state      # read a long context once ...
    python sample.py --load_state=out/book.state --prompt="What is the pass key? The pass key is"   # ... ask later
    python sample.py --load_state=out/book.state --questions=questions.txt   # one question per line, as one batch

Prints the continuation, the streaming and generation speed, and the peak memory.
"""
from __future__ import annotations

import resource
import sys
import time

import torch
from tqdm import tqdm

from checkpoint import load_model, read_checkpoint
from configurator import configure_or_exit, pick_device, pick_dtype, settings_of
from data import bos_id, get_tokenizer
from llama import attach_memories, load_llama, read_memories
from model import CHUNK_ALIGNS, Transformer
from ram import load_ram
from stream import check_state_path, generate, new_stream, read_first_chunk, repeat_state, stream
from stream import load_state as state_from_file, save_state as state_to_file  # the settings own these names

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"      # checkpoint written by train.py, or trained memories (memories.safetensors) on their base
base = ""                 # trained memories: their base model's path, if not where they were trained
init_from = ""            # instead: a Llama checkpoint directory (Hugging Face or Meta layout) or .gguf file
chunk_size = 0            # with init_from: 0 = the pretrained decoder as it is; > 0 = CoMeT, memories untrained
n_global = 16             # with init_from and chunk_size > 0: the untrained memories' sizes (0 turns one off;
temp_budget = 32          #   both 0: every chunk read alone, the chunk-local baseline)
stride = 8
tokenizer = "auto"        # with init_from: auto = its own (tokenizer.model, or the GGUF's); or bytes, a file
dtype = "auto"            # pretrained weights: auto (bf16 on a CUDA device that has it, else fp32) | float32 | bfloat16
prompt = ("The grass is green. The sky is blue. The pass key is 12345. Remember it. What is the pass key? "
          "The pass key is")
prompt_file = ""          # read the prompt from this file instead (any length)
save_state = ""           # stream the prompt, write the stream state to this file (stream.save_state), stop
load_state = ""           # continue from this state file (the context read once) instead of an empty stream
questions = ""            # a file of prompts, one per line, answered from the same state, as one batch
max_new_tokens = 20
chunk_align = "right"     # where the prompt's chunks start (model.chunk_spans), after a loaded state's open chunk too:
                          # right: the prompt and its max_new_tokens end a chunk | left: from the first token
temperature = 0.0         # 0: greedy
top_k = 0                 # 0: no top-k filtering
seed = 1337
piece = 65536             # prompt tokens streamed per call
device = "auto"           # auto | cpu | cuda
threads = 0               # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------


def open_for_inference(cfg: dict):
    """What eval_passkey.py and sample.py share: device, threads, the model and its tokenizer. The model is
    trained memories (a memories.safetensors cfg["ckpt"]) on their base model (cfg["base"], else the path
    they record); or a Llama checkpoint directory or GGUF file cfg["init_from"] (llama.py) with new,
    untrained memories if cfg["chunk_size"] > 0; or cfg["ckpt"] (trained here: CoMeT, a plain decoder, RAM,
    or memories on a frozen base). Returns (model, tokenizer, training settings, device); one clear error
    (ValueError/OSError) else."""
    dev = pick_device(cfg["device"])
    dtype = pick_dtype(cfg.get("dtype", "auto"), dev)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    if cfg["ckpt"].endswith(".safetensors"):  # trained memories alone (llama.save_memories)
        tensors, header = read_memories(cfg["ckpt"])
        train = header["settings"]
    elif cfg.get("init_from"):
        sizes = {k: cfg[k] for k in ("chunk_size", "n_global", "temp_budget", "stride") if k in cfg}
        model = load_llama(cfg["init_from"], dtype, dev, **sizes)
        name = cfg["init_from"] if cfg["tokenizer"] == "auto" else cfg["tokenizer"]
        return model, get_tokenizer(name), {}, dev
    else:
        ckpt = read_checkpoint(cfg["ckpt"])
        train = ckpt.get("config", {})
        if "base" not in ckpt:
            model, _ = (load_ram if "ram_args" in ckpt else load_model)(cfg["ckpt"], dev, ckpt)
            return model, get_tokenizer(train.get("tokenizer", "bytes")), train, dev
        tensors, header = ckpt["model"], ckpt["base"]  # memories trained on a frozen base (train.py --freeze_base)
    base = cfg.get("base") or header["base_path"]  # the base is read again, from where it is now
    return attach_memories(base, tensors, header, cfg["ckpt"], dtype, dev), base_tokenizer(base, header, train), \
        train, dev


def base_tokenizer(base: str, header: dict, train: dict):
    """The tokenizer memories were trained with: the base model's own (found at `base`, wherever it is now),
    or the one the training settings name instead (e.g. bytes)."""
    name = train.get("tokenizer", "auto")
    return get_tokenizer(base if name in ("auto", header["base_path"]) else name)


def set_block_size(model, block_size: int) -> None:
    """Let a plain decoder (or RAM's) read up to block_size positions, e.g. to test it beyond its training
    length: RoPE has no weights, only a longer table; the positions beyond training were never seen."""
    for net in model.modules():
        if isinstance(net, Transformer):
            net.config.block_size = block_size
            net.build_rope(net.tok_embeddings.weight.device)


def check_fits(model, n_tokens: int, rows: int | None = None) -> None:
    """A plain decoder (chunk_size=0; RAM's too) cannot read past its block_size; CoMeT streams any length.
    rows: what the decoder reads for n_tokens of input (RAM and truncate read fewer)."""
    cfg, rows = model.config, n_tokens if rows is None else rows
    if not cfg.comet and rows > cfg.block_size:
        raise ValueError(f"this checkpoint is a plain decoder (chunk_size=0): {n_tokens:,} tokens need {rows:,} "
                         f"positions, more than its block_size={cfg.block_size:,}; --block_size={rows} lets it "
                         "try (positions beyond its training length were never trained)")


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_prompts(cfg: dict, enc, bos: int | None, device: str) -> tuple[list[str], list[torch.Tensor]]:
    """The prompts and their token ids (1, n) each: the questions file's lines, else the prompt (file)."""
    if cfg["questions"]:
        with open(cfg["questions"], encoding="utf-8") as f:
            texts = [line.rstrip("\r\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{cfg['questions']} holds no questions (one per line)")
    elif cfg["prompt_file"]:
        with open(cfg["prompt_file"], encoding="utf-8") as f:
            texts = [f.read()]
    else:
        texts = [cfg["prompt"]]
    ids = [torch.tensor([[bos] * (bos is not None) + enc.encode_ordinary(t)], dtype=torch.long, device=device)
           for t in texts]
    if any(i.size(1) == 0 for i in ids):
        raise ValueError("the prompt is empty" + (f" (a line of {cfg['questions']})" if cfg["questions"] else ""))
    return texts, ids


def read_pieces(model, ids: torch.Tensor, state, piece: int):
    """Stream ids (B, n) after `state` in pieces of `piece` tokens (a bar when there are several); the new state."""
    for a in tqdm(range(0, ids.size(1), piece), unit="piece", disable=ids.size(1) <= piece):
        _, state = stream(model, ids[:, a:a + piece], state)
    return state


def answer(model, prompts: list[torch.Tensor], state, cfg: dict, seconds: list[float], align: str = "left"
           ) -> list[torch.Tensor]:
    """Each prompt (1, n) streamed after `state` (batch 1), then max_new_tokens generated; prompts of one token
    count run as one batch. The last prompt token goes to generate(), the rest is streamed piece by piece;
    seconds gets the time of each (streaming, generating) added. align: where the chunks still to come start
    (stream.read_first_chunk), after a loaded state's open chunk too: "right" ends each answer with a chunk."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.size(1), []).append(i)
    out = [None] * len(prompts)
    for rows in by_length.values():
        ids, st = torch.cat([prompts[i] for i in rows]), repeat_state(state, len(rows)) if len(rows) > 1 else state
        for i, row in zip(rows, ask(model, ids, st, cfg, seconds, align)):
            out[i] = row
    return out


def ask(model, ids: torch.Tensor, state, cfg: dict, seconds: list[float], align: str) -> torch.Tensor:
    """Prompts of one length ids (B, n) streamed after `state` (batch B), the chunks still to come cut as `align`
    says (stream.read_first_chunk), then max_new_tokens generated (B, max_new_tokens); seconds as in `answer`."""
    t0 = time.perf_counter()
    state, head = read_first_chunk(model, ids[:, :-1], ids.size(1) + cfg["max_new_tokens"] - 1, align, state)
    state = read_pieces(model, ids[:, head:-1], state, cfg["piece"])
    t1 = time.perf_counter()
    new, _ = generate(model, ids[:, -1:], cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None, state)
    seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.perf_counter() - t1
    return new


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    torch.manual_seed(cfg["seed"])
    try:
        if cfg["piece"] <= 0 or cfg["top_k"] < 0 or cfg["temperature"] < 0 or cfg["max_new_tokens"] < 0:
            raise ValueError("piece must be positive; top_k, temperature and max_new_tokens must be >= 0")
        if cfg["save_state"] and cfg["questions"] or cfg["questions"] and cfg["prompt_file"]:
            raise ValueError("--questions asks from a state instead of a prompt: give it without --prompt_file "
                             "and --save_state (read the context first with those two)")
        if cfg["save_state"]:
            check_state_path(cfg["save_state"])  # before a long read, not after
        model, enc, train, dev = open_for_inference(cfg)
        align = cfg["chunk_align"]
        if align not in CHUNK_ALIGNS:
            raise ValueError(f"chunk_align={align!r} must be right or left")
        if not isinstance(model, Transformer):
            raise ValueError(f"{cfg['ckpt']} is a RAM checkpoint (ram.py): it answers a question about a context "
                             "given apart; evaluate it with eval_passkey.py --method ram")
        source = cfg["init_from"] or cfg["ckpt"]
        t0 = time.perf_counter()
        state, header = state_from_file(cfg["load_state"], model, enc) if cfg["load_state"] else (new_stream(model), {})
        loaded = f"{cfg['load_state']} (loaded in {time.perf_counter() - t0:.3f} s)"
        if state.tokens.size(0) != 1:
            raise ValueError(f"{cfg['load_state']} holds the states of {state.tokens.size(0)} contexts (eval_passkey"
                             ".py --state writes one per trial); sample.py continues one: write it with --save_state")
        read = header.get("tokens_read", 0)
        bos = bos_id(enc) if cfg["init_from"] and not read else None  # a pretrained Llama expects it first
        texts, prompts = read_prompts(cfg, enc, bos, dev)
        check_fits(model, read + max(p.size(1) for p in prompts) + cfg["max_new_tokens"] * (not cfg["save_state"]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if cfg["save_state"]:
        return write_state(model, enc, prompts[0], state, read, source, cfg, dev)
    seconds = [0.0, 0.0]
    outs = answer(model, prompts, state, cfg, seconds, align)
    if cfg["questions"]:
        for t, o in zip(texts, outs):
            print(f"{t} => {enc.decode(o.tolist())}")
        print(f"{len(prompts)} questions answered from {loaded if read else 'an empty stream'} in "
              f"{sum(seconds):.3f} s ({sum(seconds) / len(prompts):.3f} s per question); "
              f"peak memory {peak_memory_mib(dev):,.1f} MiB")
        return
    print(("..." if len(texts[0]) > 300 else "") + texts[0][-300:])
    print("=> " + enc.decode(outs[0].tolist()))
    n, after = prompts[0].size(1), f" after the {read:,} of {loaded}" if read else ""
    print(f"prompt {n:,} tokens{after} streamed at {(n - 1) / max(seconds[0], 1e-9):,.0f} tok/s; "
          f"{cfg['max_new_tokens']} tokens generated at {cfg['max_new_tokens'] / max(seconds[1], 1e-9):,.1f} tok/s; "
          f"peak memory {peak_memory_mib(dev):,.1f} MiB")


def write_state(model, enc, ids: torch.Tensor, state, read: int, source: str, cfg: dict, dev: str) -> None:
    """Stream the prompt ids (1, n) piece by piece after `state` and write the state to cfg["save_state"]."""
    t0 = time.perf_counter()
    state = read_pieces(model, ids, state, cfg["piece"])
    t1 = time.perf_counter()
    try:
        size = state_to_file(cfg["save_state"], model, state, enc, read + ids.size(1), source)
    except OSError as e:  # checked before reading, but a disk can fill up meanwhile
        raise SystemExit(f"error: could not write {cfg['save_state']}: {e}")
    print(f"read {ids.size(1):,} tokens at {ids.size(1) / max(t1 - t0, 1e-9):,.0f} tok/s "
          f"({read + ids.size(1):,} in all); wrote {cfg['save_state']}: {size / 1024:,.1f} KiB in "
          f"{time.perf_counter() - t1:.3f} s; peak memory {peak_memory_mib(dev):,.1f} MiB")


if __name__ == "__main__":
    main()
