"""Issue 20's throughput lever, side by side in one process: training steps (train.train_step: batch, forward,
backward, clipping, AdamW; batch 16 at 705-767 tokens, the same batches for both) with the whole batch on 2
intra-op threads (batch_threads=1, as before) and with its rows in 2 slices, each slice's forward and backward on
its own thread with 1 intra-op thread (batch_threads=2, the default now). They alternate, three rounds, since this
machine's speed drifts within minutes.

    python docs/passkey20/speed_split.py > docs/passkey20/speed_split.txt      # from the repository root
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import train  # noqa: E402
from data import get_tokenizer  # noqa: E402

enc = get_tokenizer("bytes")
train.curriculum, train.min_len, train.max_len = 0, 705, 767  # every step near the training length
vars(train).update({k: v for k, v in train.DEFAULTS.items() if k not in vars(train)})  # RAM's settings, as main()
torch.manual_seed(0)
model = train.build_model(dict(train.DEFAULTS), enc, None, "cpu", verbose=False)  # the default job's model
optimizer = train.make_optimizer(model, fused=False)
PLANS = {"whole batch, 2 threads": (1, 2), "2 slices x 1 thread": (2, 1)}  # (slices, intra-op threads)


def train_tok_s(name: str, steps: int = 6) -> float:
    slices, threads = PLANS[name]
    torch.set_num_threads(threads)  # the slices' threads take 1 from it at their first op, as in train.main
    method, t, tokens = train.pick_method(None, "cpu", slices), time.perf_counter(), 0
    for it in range(steps):
        tokens += train.train_step(model, optimizer, method, None, torch.autocast("cpu", enabled=False), enc, it,
                                   [])[1]
    return tokens / (time.perf_counter() - t)


for name in reversed(PLANS):  # warm-up; the slices' threads start under 1 intra-op thread
    train_tok_s(name, 2)
for _ in range(3):
    for name in PLANS:
        print(f"{name:>22}: training {train_tok_s(name):8,.0f} tok/s", flush=True)
