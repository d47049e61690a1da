"""A training curve (loss and passkey accuracy) from a log.jsonl, as in docs/smollm2.md:

    python -m scripts.plot_curve LOG.jsonl OUT.png
"""
import json
import sys

from checkpoint import write_atomically
from configurator import PNG, check_output

SMOOTH = 25  # the mean of the last this many steps


def main() -> None:
    try:
        log, out = sys.argv[1], sys.argv[2]
        check_output(out, "OUT.png", PNG)  # (an argument, not a setting)
        with open(log, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        it, loss = [int(x["iter"]) for x in records], [float(x["loss"]) for x in records]
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except (IndexError, OSError, ValueError, ImportError, KeyError, TypeError) as e:
        sys.exit(f"error: {e if not isinstance(e, IndexError) else 'missing arguments'}; usage: python -m "
                 "scripts.plot_curve LOG.jsonl OUT.png (needs matplotlib)")
    mean = [sum(loss[max(0, i - SMOOTH + 1):i + 1]) / min(i + 1, SMOOTH) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(it, loss, alpha=0.3, label="loss")
    ax.plot(it, mean, label=f"mean of the last {SMOOTH} steps")
    ax.set(xlabel="iteration", ylabel="loss")
    ax2 = ax.twinx()
    evals = [x for x in records if "passkey_acc" in x]
    ax2.plot([x["iter"] for x in evals], [100 * x["passkey_acc"] for x in evals], "o-", color="C2",
             label="passkey exact match (held out)")
    ax2.set(ylabel="exact match (%)", ylim=(0, 100))
    fig.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    write_atomically(out, lambda f: fig.savefig(f, format="png", dpi=110), mode=0o644)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
