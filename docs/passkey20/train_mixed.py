"""Issue 20's half-and-half experiment (not kept, not part of train.py): each batch right- or left-aligned, half
each, chosen by its iteration; the evaluations during training read right-aligned.

    python docs/passkey20/train_mixed.py --chunk_align=mixed --out_dir=out/mixed768     # from the repository root
    RIGHT_SHARE=0.125 python docs/passkey20/train_mixed.py --chunk_align=mixed --out_dir=out/mixed768r8  # 1 in 8
"""
import os
import random
import sys
sys.path.insert(0, ".")
import train
train.CHUNK_ALIGNS = ("left", "right", "mixed")
_loss, _cell, _samples = train.lm_loss, train.passkey_cell, train.get_samples
state = {"it": 0}
SHARE = float(os.environ.get("RIGHT_SHARE", "0.5"))  # share of batches right-aligned
def get_samples(enc, it):
    state["it"] = it
    return _samples(enc, it)
def lm_loss(model, batch, pipe):
    saved = train.chunk_align
    train.chunk_align = "right" if random.Random(state["it"] * 7919 + 17).random() < SHARE else "left"
    try:
        return _loss(model, batch, pipe)
    finally:
        train.chunk_align = saved
train.get_samples, train.lm_loss = get_samples, lm_loss
train.passkey_cell = lambda *a, **k: _cell(*a, **{**k, "align": "right"})
train.main()
