"""What RAM's decoder reads on the recall task: of the eight facts, how many lie whole in the kept segments,
and how often the asked one does (docs/ram.md).

    python -m scripts.recall_kept_facts CKPT [LENGTH] [TRIALS_PER_DEPTH]
"""
import random
import sys

import numpy as np
import torch

from data import get_tokenizer
from ram.ram import groups, load_ram
from ram.tasks import make_recall

def main() -> None:
    try:
        path, length = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1024
        trials = int(sys.argv[3]) if len(sys.argv) > 3 else 100
        torch.set_num_threads(1)
        model, _ = load_ram(path)
    except (IndexError, ValueError, OSError) as e:
        sys.exit(f"error: {e if not isinstance(e, IndexError) else 'missing CKPT'}; usage: python -m "
                 "scripts.recall_kept_facts CKPT [LENGTH] [TRIALS_PER_DEPTH]")
    enc, seg = get_tokenizer("bytes"), model.ram.segment
    asked, facts = [], []
    for d in (0.0, 0.25, 0.5, 0.75, 1.0):
        rng = random.Random(777 + int(100 * d))
        samples = [make_recall(enc, length, d, rng) for _ in range(trials)]
        ((query, context, _, _),) = groups(samples, seg, "cpu")
        with torch.no_grad():
            keep = model.compress(query, context)[4]  # (B, S)
        for s, k in zip(samples, keep):
            whole = [k[a // seg:(b - 1) // seg + 1].all().item() for a, b in
                     ((i, i + len(f)) for i, f in zip(s.inserts, s.sentences))]
            asked.append(whole[s.target])
            facts.append(sum(whole))
    print(f"{path} at {length} tokens, {len(asked)} questions: asked fact kept whole {np.mean(asked):.1%}, "
          f"facts kept whole per question {np.mean(facts):.2f} (of 8), other facts {np.mean(facts) - np.mean(asked):.2f}")


if __name__ == "__main__":
    main()
