"""Stream a prompt of any length through the memories (docs/design.md, S6), then generate.

    python sample.py                                   # the shipped model (or out/ckpt.pt) answers a passkey
    python sample.py --prompt_file=book.txt --max_new_tokens=100 --temperature=0.8 --top_k=40
    python sample.py --init_from=/path/to/Llama-3.2-1B --prompt="The capital of France is"
    python sample.py --prompt_file=book.txt --save_state=out/book.state      # read a long context once ...
    python sample.py --load_state=out/book.state --prompt="What is the pass key? The pass key is"   # ... ask later
    python sample.py --load_state=out/book.state --questions=questions.txt   # one question per line, as one batch

Prints the continuation, the streaming and generation speed, and the peak memory.
"""
from __future__ import annotations

import time

import torch

from configurator import configure_or_exit, peak_memory_mib, settings_of
from data import bos_id, read_text
from eval_passkey import check_fits, checkpoint_path, open_model
from model import CHUNK_ALIGNS
from stream import check_state_path, generate, load_state as state_from_file, new_stream, read, repeat_state, \
    save_state as state_to_file

# -----------------------------------------------------------------------------
ckpt = ""                 # train.py's checkpoint, a model file or trained memories; "": out/ckpt.pt, else the shipped
base_path = ""            # trained memories: their base model's path, if not where they were trained
init_from = ""            # instead: a Llama checkpoint directory (Hugging Face or Meta layout) or .gguf file
chunk_size = 0            # with init_from: 0 = the pretrained decoder as it is; > 0 = CoMeT, memories untrained
n_global = 16             # with init_from and chunk_size > 0: the untrained memories' sizes
temp_budget = 32
stride = 8
tokenizer = "auto"        # with init_from: auto = its own (tokenizer.model, or the GGUF's); or bytes, a file
dtype = "auto"            # pretrained weights: auto (bf16 on a CUDA device that has it, else fp32) | float32 | bfloat16
prompt = ("The grass is green. The sky is blue. The pass key is 12345. Remember it. What is the pass key? "
          "The pass key is")
prompt_file = ""          # read the prompt from this file instead (any length)
save_state = ""           # stream the prompt, write the stream state to this file (stream.save_state), stop
load_state = ""           # continue from this state file (the context read once) instead of an empty stream
questions = ""            # a file of prompts, one per line, answered from the same state, as one batch
max_new_tokens = 6        # the passkey's answer: a space and 5 digits
chunk_align = "right"     # where the prompt's chunks start: right (the prompt and its max_new_tokens end a chunk) | left
temperature = 0.0         # 0: greedy
top_k = 0                 # 0: no top-k filtering
seed = 1337
piece = 65536             # prompt tokens streamed per call
device = "auto"           # auto | cpu | cuda
threads = 0               # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------


def read_prompts(cfg: dict, enc, bos: int | None, device: str) -> tuple[list[str], list[torch.Tensor]]:
    """The prompts and their token ids (1, n) each: the questions file's lines, else the prompt (file)."""
    if cfg["questions"]:
        texts = [line for line in read_text(cfg["questions"], "--questions").split("\n") if line.strip()]
        if not texts:
            raise ValueError(f"{cfg['questions']} holds no questions (one per line)")
    elif cfg["prompt_file"]:
        texts = [read_text(cfg["prompt_file"], "--prompt_file")]
    else:
        texts = [cfg["prompt"]]
    ids = [torch.tensor([[bos] * (bos is not None) + enc.encode_ordinary(t)], dtype=torch.long, device=device)
           for t in texts]
    if any(i.size(1) == 0 for i in ids):
        raise ValueError("the prompt is empty" + (f" (a line of {cfg['questions']})" if cfg["questions"] else ""))
    return texts, ids


def answer(model, prompts: list[torch.Tensor], state, cfg: dict, seconds: list[float]) -> list[torch.Tensor]:
    """Each prompt (1, n) read after `state` (batch 1; prompts of one length as one batch), the chunks still to come
    cut as chunk_align says (stream.read), then max_new_tokens generated; seconds[0], [1]: reading, generating."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(p.size(1), []).append(i)
    out = [None] * len(prompts)
    for rows in by_length.values():
        ids, t0 = torch.cat([prompts[i] for i in rows]), time.perf_counter()
        st = read(model, lambda a, b: ids[:, a:b], ids.size(1) - 1, repeat_state(state, len(rows)) if len(rows) > 1
                  else state, cfg["chunk_align"], cfg["max_new_tokens"], cfg["piece"], progress=True)
        t1 = time.perf_counter()
        new, _ = generate(model, ids[:, -1:], cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None, st)
        seconds[0], seconds[1] = seconds[0] + t1 - t0, seconds[1] + time.perf_counter() - t1
        for i, row in zip(rows, new):
            out[i] = row
    return out


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    torch.manual_seed(cfg["seed"])
    try:
        if cfg["piece"] <= 0 or cfg["top_k"] < 0 or cfg["temperature"] < 0 or cfg["max_new_tokens"] < 0:
            raise ValueError("piece must be positive; top_k, temperature and max_new_tokens must be >= 0")
        if cfg["questions"] and (cfg["save_state"] or cfg["prompt_file"]):
            raise ValueError("--questions asks from a state instead of a prompt: give it without --prompt_file and "
                             "--save_state (read the context first with those two)")
        if cfg["chunk_align"] not in CHUNK_ALIGNS:
            raise ValueError(f"chunk_align={cfg['chunk_align']!r} must be right or left")
        if cfg["save_state"]:
            check_state_path(cfg["save_state"])  # before a long read, not after
        model, enc, _, dev = open_model(cfg)
        state, header = state_from_file(cfg["load_state"], model, enc) if cfg["load_state"] else (new_stream(model), {})
        if state.tokens.size(0) != 1:
            raise ValueError(f"{cfg['load_state']} holds the states of {state.tokens.size(0)} contexts (eval_passkey"
                             ".py --state writes one per trial); sample.py continues one: write it with --save_state")
        done = header.get("tokens_read", 0)
        texts, prompts = read_prompts(cfg, enc, bos_id(enc) if cfg["init_from"] and not done else None, dev)
        check_fits(model, done + max(p.size(1) for p in prompts) + cfg["max_new_tokens"] * (not cfg["save_state"]))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if cfg["save_state"]:  # the prompt read in pieces, its state written
        t0 = time.perf_counter()
        state = read(model, lambda a, b: prompts[0][:, a:b], prompts[0].size(1), state, "left", 0, cfg["piece"], True)
        try:
            size = state_to_file(cfg["save_state"], model, state, enc, done + prompts[0].size(1),
                                 cfg["init_from"] or checkpoint_path(cfg["ckpt"]))
        except OSError as e:  # checked before reading, but a disk can fill up meanwhile
            raise SystemExit(f"error: could not write {cfg['save_state']}: {e}")
        return print(f"read {prompts[0].size(1):,} tokens in {time.perf_counter() - t0:.2f} s "
                     f"({done + prompts[0].size(1):,} in all); wrote {cfg['save_state']}: {size / 1024:,.1f} KiB; "
                     f"peak memory {peak_memory_mib(dev):,.1f} MiB")
    seconds = [0.0, 0.0]
    outs = answer(model, prompts, state, cfg, seconds)
    for text, out in zip(texts, outs):
        if cfg["questions"]:
            print(f"{text} => {enc.decode(out.tolist())}")
        else:
            print(("..." if len(text) > 300 else "") + text[-300:] + "\n=> " + enc.decode(out.tolist()))
    n, after = sum(p.size(1) for p in prompts), f" after the {done:,} tokens of {cfg['load_state']}" if done else ""
    print(f"{len(prompts)} prompt(s), {n:,} tokens{after}, read at {n / max(seconds[0], 1e-9):,.0f} tok/s; "
          f"{cfg['max_new_tokens'] * len(prompts)} tokens generated at "
          f"{cfg['max_new_tokens'] * len(prompts) / max(seconds[1], 1e-9):,.1f} tok/s; peak memory "
          f"{peak_memory_mib(dev):,.1f} MiB")

if __name__ == "__main__":
    main()
