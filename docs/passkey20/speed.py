"""Issue 20's speed levers in one process: training steps at the longest length of the recipe before issue
20's second lever (batch 16 x 512 tokens) and streaming (batch 1, 8,192 tokens). fp32 and bf16 autocast
alternate, twice each, since this machine's speed drifts within minutes; then every decoder block compiled
(in place: after them, not interleaved, so its gain is within that drift).

    python docs/passkey20/speed.py > docs/passkey20/speed.txt      # from the repository root, 2 threads
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import train  # noqa: E402
from bench import device_name  # noqa: E402
from data import get_tokenizer  # noqa: E402
from model import Block  # noqa: E402
from stream import new_stream, stream  # noqa: E402

torch.set_num_threads(2)
enc = get_tokenizer("bytes")
train.curriculum, train.min_len, train.max_len = 0, 512, 512  # every step at 512 tokens, as speed.txt was measured
train.chunk_align = "left"  # as speed.txt was measured (before chunk_align = "mixed")
vars(train).update({k: v for k, v in train.DEFAULTS.items() if k not in vars(train)})  # RAM's settings, as main()
model = train.build_model(dict(train.DEFAULTS), enc, None, "cpu", verbose=False)
optimizer = train.make_optimizer(model, fused=False)
method = train.pick_method(None, "cpu")
AUTOCAST = {"fp32": torch.autocast("cpu", enabled=False), "bf16": torch.autocast("cpu", dtype=torch.bfloat16)}
text = torch.randint(256, (1, 8192))


def train_tok_s(mode: str, steps: int = 6) -> float:
    t, tokens = time.perf_counter(), 0
    for it in range(steps):
        tokens += train.train_step(model, optimizer, method, None, AUTOCAST[mode], enc, it, [])[1]
    return tokens / (time.perf_counter() - t)


def stream_tok_s(mode: str) -> float:
    model.eval()
    t = time.perf_counter()
    with torch.no_grad(), AUTOCAST[mode]:
        stream(model, text, new_stream(model, 1))
    model.train()
    return text.numel() / (time.perf_counter() - t)


def measure(label: str, mode: str) -> None:
    print(f"{label:>9}: training {train_tok_s(mode):8,.0f} tok/s   streaming {stream_tok_s(mode):8,.0f} tok/s",
          flush=True)


print(f"# {device_name('cpu')}, torch {torch.__version__}")
for mode in ("fp32", "bf16"):  # warm-up
    train_tok_s(mode, 2)
    stream_tok_s(mode)
for _ in range(2):
    measure("fp32", "fp32")
    measure("bf16", "bf16")
t0 = time.perf_counter()
for block in model.modules():
    if isinstance(block, Block):
        block.compile(dynamic=True)
train_tok_s("fp32", 12)  # compiles (and recompiles for each new shape)
stream_tok_s("fp32")
print(f"compiling took {time.perf_counter() - t0:.0f} s (with the 12 training steps and the stream it compiles for)")
for _ in range(2):
    measure("compiled", "fp32")
