"""A training curve (loss and passkey accuracy) from a log.jsonl, as in docs/smollm2.md:

    python scripts/plot_curve.py [log.jsonl] [out.png]
"""
import json, sys, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
def main() -> None:
    r = [json.loads(l) for l in open(sys.argv[1] if len(sys.argv) > 1 else "docs/smollm2/train_log.jsonl")]
    it = [x["iter"] for x in r]; loss = [x["loss"] for x in r]
    k = 25
    avg = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(it, loss, alpha=0.3, label="loss (answer NLL + 0.1 x LM NLL)")
    ax.plot(it, avg, label=f"mean of the last {k} steps")
    ax.set_xlabel("iteration (batch 4, 256-512 tokens)"); ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ev = [x for x in r if "passkey_acc" in x]
    ax2.plot([x["iter"] for x in ev], [100 * x["passkey_acc"] for x in ev], "o-", color="C2", label="passkey exact match at 512 (20 held-out trials)")
    ax2.set_ylabel("exact match (%)"); ax2.set_ylim(0, 100)
    fig.legend(loc="upper right", bbox_to_anchor=(0.88, 0.93), fontsize=7); fig.tight_layout(); out = sys.argv[2] if len(sys.argv) > 2 else "docs/smollm2/training_curve.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
