"""Stream a prompt of any length through the memories (S6), then generate.

    python sample.py --prompt="What is the pass key? The pass key is" --max_new_tokens=20
    python sample.py --prompt_file=book.txt --temperature=0.8 --top_k=40
    python sample.py --init_from=/path/to/Llama-3.2-1B --prompt="The capital of France is"
    python sample.py --init_from=model.gguf --chunk_size=512 --prompt_file=book.txt   # llama.cpp's format

Prints the continuation, the streaming and generation speed, and the peak memory.
"""
from __future__ import annotations

import time

import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"      # checkpoint written by train.py
init_from = ""            # instead: a Llama checkpoint directory (Hugging Face or Meta layout) or .gguf file
chunk_size = 0            # with init_from: 0 = the pretrained decoder as it is; > 0 = CoMeT, memories untrained
tokenizer = "auto"        # with init_from: auto = its own (tokenizer.model, or the GGUF's); or bytes, a file
dtype = "auto"            # with init_from: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
prompt = "The grass is green. The sky is blue. The pass key is 12345. Remember it. What is the pass key? The pass key is"
prompt_file = ""          # read the prompt from this file instead (any length)
max_new_tokens = 20
temperature = 0.0         # 0: greedy
top_k = 0                 # 0: no top-k filtering
seed = 1337
piece = 65536             # prompt tokens streamed per call
device = "auto"           # auto | cpu | cuda
threads = 0               # torch CPU threads; 0 = torch's default
# -----------------------------------------------------------------------------


def main() -> None:
    from checkpoint import check_fits, open_for_inference
    from configurator import configure_or_exit, settings_of
    from data import bos_id
    from eval_passkey import peak_memory_mib

    cfg = configure_or_exit(settings_of(globals()))
    torch.manual_seed(cfg["seed"])
    try:
        if cfg["piece"] <= 0 or cfg["top_k"] < 0 or cfg["temperature"] < 0 or cfg["max_new_tokens"] < 0:
            raise ValueError("piece must be positive; top_k, temperature and max_new_tokens must be >= 0")
        model, enc, _, dev = open_for_inference(cfg)
        if not hasattr(model, "stream"):
            raise ValueError(f"{cfg['ckpt']} is a RAM checkpoint (ram.py): it answers a question about a context "
                             "given apart; evaluate it with eval_passkey.py --method ram")
        if cfg["prompt_file"]:
            with open(cfg["prompt_file"], encoding="utf-8") as f:
                text = f.read()
        else:
            text = cfg["prompt"]
        bos = bos_id(enc) if cfg["init_from"] else None  # a pretrained Llama expects its begin-of-text token
        ids = torch.tensor([[bos] * (bos is not None) + enc.encode_ordinary(text)], dtype=torch.long, device=dev)
        if ids.size(1) == 0:
            raise ValueError("the prompt is empty")
        check_fits(model, ids.size(1) + cfg["max_new_tokens"])
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    state = model.new_stream(1)
    t0 = time.perf_counter()
    head, last = ids[:, :-1], ids[:, -1:]  # the last prompt token goes to generate()
    for a in tqdm(range(0, head.size(1), cfg["piece"]), unit="piece", disable=head.size(1) <= cfg["piece"]):
        _, state = model.stream(head[:, a:a + cfg["piece"]], state)
    t1 = time.perf_counter()
    out, state = model.generate(last, cfg["max_new_tokens"], temperature=cfg["temperature"],
                                top_k=cfg["top_k"] or None, state=state)
    t2 = time.perf_counter()
    print(("..." if len(text) > 300 else "") + text[-300:])
    print("=> " + enc.decode(out[0].tolist()))
    print(f"prompt {ids.size(1):,} tokens streamed at {head.size(1) / max(t1 - t0, 1e-9):,.0f} tok/s; "
          f"{cfg['max_new_tokens']} tokens generated at {cfg['max_new_tokens'] / max(t2 - t1, 1e-9):,.1f} tok/s; "
          f"peak memory {peak_memory_mib(dev):,.1f} MiB")


if __name__ == "__main__":
    main()
