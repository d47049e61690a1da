"""Issue 20: where a chunk border cuts the passkey sentence, and what it costs. Two sweeps at 3,072 tokens, greedy
exact match (eval_passkey.passkey_cell), chunks right-aligned as eval_passkey reads them:

  keys: the sentence at 64 consecutive positions near the middle, so that the border falls at every one of
        its 64 offsets in a chunk (N trials each);
  last: depth 100% (the sentence right before the question), read with a last chunk of T tokens instead of a
        full one (T = 64 is eval_passkey's right alignment; the last chunk then holds the sentence's last T - 42
        tokens, after which come the 37-token question and the 5 answer tokens read back).

    python docs/passkey20/cuts.py CKPT [N] > docs/passkey20/cuts_NAME.txt     # from the repository root, 1 thread
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import model as modellib  # noqa: E402
import stream  # noqa: E402
from checkpoint import load_model  # noqa: E402
from data import get_tokenizer  # noqa: E402
from eval_passkey import passkey_cell  # noqa: E402

torch.set_num_threads(1)
enc = get_tokenizer("bytes")
net, _ = load_model(sys.argv[1], "cpu")
net.eval()
N, L = int(sys.argv[2]) if len(sys.argv) > 2 else 20, 3072
n_filler = L - 59 - 37 - 6  # sentence, question, answer (bytes tokenizer, grass filler)
first = (L - 2) % 64 + 1  # right-aligned: the first chunk of the L - 1 tokens read


def cell(depth: float, seed: int, trials: int) -> str:
    right = [0] * 6
    ok = passkey_cell(net, enc, L, depth, trials, seed, 5, align="right", tokens_right=right)
    return f"{ok:3d}/{trials}  right per answer token {right}"


print(f"{sys.argv[1]}: keys at 64 offsets of their chunk, {N} trials each (3,072 tokens, right-aligned)")
total = 0
for k in range(64):
    insert = n_filler // 2 + k
    line = cell(insert / n_filler, 1234 + k, N)
    total += int(line.split("/")[0])
    print(f"  sentence starts at offset {(insert - first) % 64:2d} of its chunk: {line}", flush=True)
print(f"  all offsets: {total}/{64 * N}")

real = modellib.chunk_spans
T = [64]


def last_chunk_of_T(n: int, cs: int, align: str = "left") -> list[range]:
    """Right alignment with a last chunk of T[0] tokens (a probe, not a chunk plan of the library)."""
    if align != "right" or not n:
        return real(n, cs, align)
    head = (n - T[0] - 1) % cs + 1
    return [range(a, min(b, n)) for a, b in zip([0, *range(head, n, cs)], range(head, n + cs, cs))]


modellib.chunk_spans = stream.chunk_spans = last_chunk_of_T
print(f"depth 100%, last chunk of T tokens, {5 * N // 2} trials each")
for t in (64, 63, 62, 61, 60, 56, 50):
    T[0] = t
    print(f"  T = {t}: sentence tokens in the last chunk {t - 42:2d}: {cell(1.0, 99, 5 * N // 2)}", flush=True)
