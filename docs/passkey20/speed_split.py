"""Issue 20's speed before and after, side by side in one process. Training steps (train.train_step: batch,
forward, backward, clipping, AdamW; batch 16 at 705-767 tokens, the same batches for both): before, the whole
batch on 2 intra-op threads cut from the first token (batch_threads=1, chunk_align=left); after, the default: its
rows in 2 slices, each slice's forward and backward on its own thread with 1 intra-op thread (batch_threads=2),
with the default's chunk plans (chunk_align=mixed). Streaming one 8,191-token sequence on 2 threads: before from
the first token, after right-aligned (as eval_passkey.py and sample.py read now). Before and after alternate,
three rounds, since this machine's speed drifts within minutes; the first line names the processor.

    python docs/passkey20/speed_split.py > docs/passkey20/speed_split.txt      # from the repository root
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import train  # noqa: E402
from bench import device_name  # noqa: E402
from data import get_tokenizer  # noqa: E402
from stream import read_first_chunk, stream  # noqa: E402

enc = get_tokenizer("bytes")
train.curriculum, train.min_len, train.max_len = 0, 705, 767  # every step near the training length
vars(train).update({k: v for k, v in train.DEFAULTS.items() if k not in vars(train)})  # RAM's settings, as main()
torch.manual_seed(0)
model = train.build_model(dict(train.DEFAULTS), enc, None, "cpu", verbose=False)  # the default job's model
optimizer = train.make_optimizer(model, fused=False)
# (slices, intra-op threads, training's chunk plan, streaming's); mixed's coins for iterations 0-5 cut one of
# the six right-aligned (speed_align.txt: both plans cost the same)
PLANS = {"before": (1, 2, "left", "left"), "after": (2, 1, "mixed", "right")}
text = torch.randint(256, (1, 8191))


def train_tok_s(name: str, steps: int = 6) -> float:
    slices, threads, train.chunk_align, _ = PLANS[name]
    torch.set_num_threads(threads)  # the slices' threads take 1 from it at their first op, as in train.main
    method, t, tokens = train.pick_method(None, "cpu", slices), time.perf_counter(), 0
    for it in range(steps):
        tokens += train.train_step(model, optimizer, method, None, torch.autocast("cpu", enabled=False), enc, it,
                                   [])[1]
    return tokens / (time.perf_counter() - t)


def stream_tok_s(name: str) -> float:
    torch.set_num_threads(2)
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        state, head = read_first_chunk(model, text, text.size(1), PLANS[name][3])
        stream(model, text[:, head:], state)
    model.train()
    return text.numel() / (time.perf_counter() - t)


print(f"# {device_name('cpu')}, torch {torch.__version__}")
for name in reversed(PLANS):  # warm-up; the slices' threads start under 1 intra-op thread
    train_tok_s(name, 2)
    stream_tok_s(name)
for _ in range(3):
    for name in PLANS:
        print(f"{name:>6}: training {train_tok_s(name):8,.0f} tok/s   streaming {stream_tok_s(name):8,.0f} tok/s",
              flush=True)
