"""Questions asked from a saved state: greedy exact match of the passkey by where the state's open chunk ends,
for one checkpoint. The context (the sequence up to its question) is read from its first token, as
`sample.py --save_state` reads it; then the question is asked as `sample.py --load_state` asks it, with the
chunks still to come cut from where the state's open chunk starts (left: they go on where they are; right: a
short chunk first, so that the question and its answer end a chunk; stream.read_first_chunk). For comparison,
the whole sequence read right-aligned at once, as eval_passkey.py reads it. Lengths 705-768 put the state's end
at every offset of a chunk once.

    python docs/passkey20/ask_state.py out/default/ckpt.pt > docs/passkey20/ask_state_default.txt   # 2 threads, ~1 min
"""
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data import sample_batch  # noqa: E402
from sample import ask, open_for_inference  # noqa: E402
from stream import new_stream, stream  # noqa: E402

TRIALS = 32  # sequences per length, depths uniform in [0, 1]


torch.set_num_threads(2)
path = sys.argv[1] if len(sys.argv) > 1 else "out/ckpt.pt"
model, enc, train, _ = open_for_inference(dict(device="cpu", dtype="float32", threads=2, ckpt=path))
model.eval()
cs, rng, misses = model.config.chunk_size, random.Random(4242), {"left": 0, "right": 0, "whole": 0}
print(f"{path} (trained with chunk_align={train.get('chunk_align', 'left')}): misses of {TRIALS} per length, "
      f"greedy\n  length  open  from a state: left  right   read whole: right")
with torch.no_grad():
    for length in range(cs * 11 + 1, cs * 12 + 1):
        group = sample_batch(enc, TRIALS, length, rng.randrange(2**62), train.get("digits", 5), edges=0.0)
        seq = torch.from_numpy(np.stack([s.tokens(0, s.length) for s in group]))
        n_context, n_answer = group[0].n_context, len(group[0].answer)
        prompt, answer = seq[:, n_context:-n_answer], seq[:, -n_answer:]
        _, state = stream(model, seq[:, :n_context], new_stream(model, TRIALS))  # as --save_state reads it
        cfg, seconds = dict(piece=65536, max_new_tokens=n_answer, temperature=0.0, top_k=0), [0.0, 0.0]
        row = {align: ask(model, prompt, state, cfg, seconds, align) for align in ("left", "right")}  # sample.py's
        row["whole"] = ask(model, seq[:, :-n_answer], new_stream(model, TRIALS), cfg, seconds, "right")  # steps
        row = {k: int((out != answer).any(1).sum()) for k, out in row.items()}
        for k in misses:
            misses[k] += row[k]
        print(f"  {length:6d}  {state.tokens.size(1):4d}  {row['left']:17d}  {row['right']:5d}  {row['whole']:17d}")
print(f"all {cs} lengths, {cs * TRIALS} questions: from a state left {misses['left']}, right {misses['right']}; "
      f"read whole right {misses['whole']} missed")
