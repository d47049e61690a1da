"""Issue 20's third lever, side by side in one process: training steps and streaming with chunks cut from the
first token (left) and right-aligned (the answer ends the last chunk, the first one is short). Training: batch 16
at 705-767 tokens (both plans give each sequence the same number of chunks); streaming: one 8,191-token sequence
(right: a first chunk of 63 tokens, read and closed, then the rest). Left and right alternate, three times each,
since this machine's speed drifts within minutes.

    python docs/passkey20/speed_align.py > docs/passkey20/speed_align.txt      # from the repository root, 2 threads
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import train  # noqa: E402
from data import get_tokenizer  # noqa: E402
from stream import read_first_chunk, stream  # noqa: E402

torch.set_num_threads(2)
enc = get_tokenizer("bytes")
train.curriculum, train.min_len, train.max_len = 0, 705, 767  # every step near the training length
vars(train).update({k: v for k, v in train.DEFAULTS.items() if k not in vars(train)})  # RAM's settings, as main()
model = train.build_model(dict(train.DEFAULTS), enc, None, "cpu", verbose=False)
optimizer = train.make_optimizer(model, fused=False)
method = train.pick_method(None, "cpu")
text = torch.randint(256, (1, 8191))


def train_tok_s(align: str, steps: int = 6) -> float:
    train.chunk_align, t, tokens = align, time.perf_counter(), 0
    for it in range(steps):
        tokens += train.train_step(model, optimizer, method, None, torch.autocast("cpu", enabled=False), enc, it,
                                   [])[1]
    return tokens / (time.perf_counter() - t)


def stream_tok_s(align: str) -> float:
    model.eval()
    t = time.perf_counter()
    with torch.no_grad():
        state, head = read_first_chunk(model, text, text.size(1), align)
        stream(model, text[:, head:], state)
    model.train()
    return text.numel() / (time.perf_counter() - t)


for align in ("left", "right"):  # warm-up
    train_tok_s(align, 2)
    stream_tok_s(align)
for _ in range(3):
    for align in ("left", "right"):
        print(f"{align:>5}: training {train_tok_s(align):8,.0f} tok/s   streaming {stream_tok_s(align):8,.0f} tok/s",
              flush=True)
