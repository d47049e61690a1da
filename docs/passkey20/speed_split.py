"""Side by side: one training batch's forward + backward on 2 intra-op threads, against the same batch split
in two halves, each run by its own Python thread on one core (intra-op threads 1). A lever of issue 20,
measured and not kept (docs/passkey20.md).

    python docs/passkey20/speed_split.py 705 > docs/passkey20/speed_split.txt   # tokens per sequence
"""
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import train  # noqa: E402
from data import filler_tokens, get_tokenizer, sample_batch  # noqa: E402

enc = get_tokenizer("bytes")
torch.manual_seed(0)
model = train.build_model(dict(train.DEFAULTS), enc, None, "cpu", verbose=False)  # the default job's model
length = int(sys.argv[1]) if len(sys.argv) > 1 else 705
rows = sample_batch(enc, 16, length, 1, 5, filler=filler_tokens(enc, "grass", "train"), edges=0.2)
(x, y, answer), n = train.lm_batch(rows, "cpu")
pool = ThreadPoolExecutor(2)


def backward(rows: slice) -> torch.Tensor:
    logits, _ = model(x[rows])
    loss = train.passkey_loss(logits, y[rows], answer[rows], whole=answer)  # the halves' losses add up
    loss.backward()
    return loss.detach()


def one_batch() -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return backward(slice(None))


def two_halves() -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    return sum(pool.map(backward, [slice(0, 8), slice(8, 16)]))


print(f"batch 16 x {length} tokens, forward + backward, 3 steps per row")
for _ in range(3):
    for name, step, threads in [("2 threads, one batch", one_batch, 2), ("1 thread x 2 halves", two_halves, 1)]:
        torch.set_num_threads(threads)
        step()  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            loss = step()
        print(f"{name:22s} {3 * n / (time.perf_counter() - t):8,.0f} tok/s   loss {float(loss):.5f}", flush=True)
torch.set_num_threads(2)
one_batch()
whole = [p.grad.clone() for p in model.parameters()]
two_halves()
print("largest gradient difference:", max(float((g - p.grad).abs().max()) for g, p in zip(whole, model.parameters())))
