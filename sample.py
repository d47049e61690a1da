"""Stream a prompt of any length through the memories (S6), then generate; and what every inference script
shares: opening a model (a checkpoint of ours, or a Llama) and the plain decoder's length limit.

    python sample.py --prompt="What is the pass key? The pass key is" --max_new_tokens=20
    python sample.py --prompt_file=book.txt --temperature=0.8 --top_k=40
    python sample.py --init_from=/path/to/Llama-3.2-1B --prompt="The capital of France is"
    python sample.py --init_from=model.gguf --chunk_size=512 --prompt_file=book.txt   # llama.cpp's format
    python sample.py --ckpt=docs/smollm2/memories.safetensors --prompt_file=essay.txt  # trained memories on SmolLM2

Prints the continuation, the streaming and generation speed, and the peak memory.
"""
from __future__ import annotations

import resource
import time

import torch
from tqdm import tqdm

from checkpoint import load_model, read_checkpoint
from configurator import configure_or_exit, pick_device, pick_dtype, settings_of
from data import bos_id, get_tokenizer
from llama import attach_memories, load_llama, read_memories
from model import Transformer
from ram import load_ram
from stream import generate, new_stream, stream

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
max_new_tokens = 20
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


def main() -> None:
    cfg = configure_or_exit(settings_of(globals()))
    torch.manual_seed(cfg["seed"])
    try:
        if cfg["piece"] <= 0 or cfg["top_k"] < 0 or cfg["temperature"] < 0 or cfg["max_new_tokens"] < 0:
            raise ValueError("piece must be positive; top_k, temperature and max_new_tokens must be >= 0")
        model, enc, _, dev = open_for_inference(cfg)
        if not isinstance(model, Transformer):
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
    state = new_stream(model, 1)
    t0 = time.perf_counter()
    head, last = ids[:, :-1], ids[:, -1:]  # the last prompt token goes to generate()
    for a in tqdm(range(0, head.size(1), cfg["piece"]), unit="piece", disable=head.size(1) <= cfg["piece"]):
        _, state = stream(model, head[:, a:a + cfg["piece"]], state)
    t1 = time.perf_counter()
    out, state = generate(model, last, cfg["max_new_tokens"], temperature=cfg["temperature"],
                          top_k=cfg["top_k"] or None, state=state)
    t2 = time.perf_counter()
    print(("..." if len(text) > 300 else "") + text[-300:])
    print("=> " + enc.decode(out[0].tolist()))
    print(f"prompt {ids.size(1):,} tokens streamed at {head.size(1) / max(t1 - t0, 1e-9):,.0f} tok/s; "
          f"{cfg['max_new_tokens']} tokens generated at {cfg['max_new_tokens'] / max(t2 - t1, 1e-9):,.1f} tok/s; "
          f"peak memory {peak_memory_mib(dev):,.1f} MiB")


if __name__ == "__main__":
    main()
