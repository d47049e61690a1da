"""Passkey results split by which memory could carry the key, as in docs/smollm2.md's table:

    python -m scripts.passkey_reach TOKENIZER TRAINED.json [NAME=OTHER.json ...]

Each cell (length, depth) of eval_passkey's JSON is placed by where its key sentence ends, counted in the trained
model's chunks (left-aligned, chunk_size tokens): in the question's own chunk, within the FIFO's reach (the
temp_budget / ceil(chunk_size / stride) chunks before it), or further back, where only the global memory holds
it. Prints, per length, each model's exact match (%) over the cells of each kind and the share of the key's digits
right in the global-only cells (a random digit: 10%).
"""
import json
import random
import sys

from data import get_tokenizer, make_passkey
from memory import fifo_chunks

KINDS = ("global only", "FIFO reach", "own chunk")


def kind(enc, plan: dict, length: int, depth: float) -> str:
    """Where the key of a cell sits for a model with this chunk plan (eval_passkey's JSON header)."""
    p = make_passkey(enc, length, depth, random.Random(0), filler=[0] * 8)  # positions do not depend on the text
    cs = plan["chunk_size"]
    back = (length - 1) // cs - (p.insert + len(p.sentence) - 1) // cs  # chunks between the key and the question
    return KINDS[2] if back == 0 else KINDS[1] if back <= fifo_chunks(cs, plan["stride"], plan["temp_budget"]) \
        else KINDS[0]


def rows(enc, plan: dict, results: dict[str, dict]) -> list[str]:
    """Markdown rows: a length each, (exact match by kind) per model, digits right where only G holds the key."""
    where = {(c["length"], c["depth"]): kind(enc, plan, c["length"], c["depth"])
             for r in results.values() for c in r["cells"]}
    out = []
    for length in sorted({n for n, _ in where}):
        line = [f"{length:,}"]
        for r in results.values():
            cells = [c for c in r["cells"] if c["length"] == length]
            for k in KINDS:
                mine = [c for c in cells if where[length, c["depth"]] == k]
                n = sum(c["trials"] for c in mine)
                line.append(f"{100 * sum(c['correct'] for c in mine) / n:.0f}" if n else "-")
            far = [c for c in cells if where[length, c["depth"]] == KINDS[0] and "tokens_right" in c]
            digits = sum(sum(c["tokens_right"][1:]) for c in far)  # token 0 is the space before the digits
            total = sum(c["trials"] * (len(c["tokens_right"]) - 1) for c in far)
            line.append(f"{100 * digits / total:.0f}" if total else "-")
        out.append("| " + " | ".join(line) + " |")
    return out


def main() -> None:
    try:
        tokenizer, trained, *others = sys.argv[1:]
        named = {"trained": trained, **dict(a.split("=", 1) for a in others)}
        results = {}
        for name, path in named.items():
            with open(path, encoding="utf-8") as f:
                results[name] = json.load(f)
        enc, plan = get_tokenizer(tokenizer), results["trained"]
    except (ValueError, OSError, KeyError) as e:
        sys.exit(f"error: {e}; usage: python -m scripts.passkey_reach TOKENIZER TRAINED.json [NAME=OTHER.json ...]")
    head = ["length"] + [f"{n}: {k}" for n in results for k in (*KINDS, "digits (G only)")]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("\n".join(rows(enc, plan, results)))


if __name__ == "__main__":
    main()
