"""Where the misses are: teacher-forced exact match of the passkey answer by where the sequence's end falls
relative to a chunk border, for one checkpoint read with both chunk plans (model.chunk_spans). Lengths
705-768 cover every offset once: (length - 1) % chunk_size is how many of the model's input tokens (the
sequence but its last token) fall into the last chunk when chunks start at the first token (left; 0: the last
chunk is full); right-aligned, the answer always ends a chunk.

    python docs/passkey20/offsets.py out/len768/ckpt.pt > docs/passkey20/offsets_len768.txt   # 2 threads, ~2 min
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from data import sample_batch, stack  # noqa: E402
from sample import open_for_inference  # noqa: E402

TRIALS = 32  # sequences per length, depths uniform in [0, 1]

torch.set_num_threads(2)
path = sys.argv[1] if len(sys.argv) > 1 else "out/ckpt.pt"
model, enc, train, _ = open_for_inference(dict(device="cpu", dtype="float32", threads=2, ckpt=path))
model.eval()
cs, rng, misses = model.config.chunk_size, random.Random(4242), {"left": [], "right": []}
print(f"{path} (trained with chunk_align={train.get('chunk_align', 'left')}): misses of {TRIALS} per length, "
      f"teacher-forced\n(length-1)%{cs}  length   left  right")
with torch.no_grad():
    for length in range(cs * 11 + 1, cs * 12 + 1):
        tokens, answer = stack(sample_batch(enc, TRIALS, length, rng.randrange(2**62), train.get("digits", 5),
                                            edges=0.0))
        x, y, a = (torch.from_numpy(t) for t in (tokens[:, :-1], tokens[:, 1:], answer[:, 1:]))
        for align, row in misses.items():
            right = (model(x, align=align)[0].argmax(-1) == y) | ~a  # (B, T): every answer token right
            row.append(int((~right.all(1)).sum()))
        print(f"{(length - 1) % cs:14d}  {length:6d}  {misses['left'][-1]:5d}  {misses['right'][-1]:5d}")
print(f"all {cs} lengths: left {sum(misses['left'])}, right {sum(misses['right'])} misses in {cs * TRIALS}")
