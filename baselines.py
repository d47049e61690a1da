"""Baselines that are CoMeT's model with one piece swapped: here the sliding-window attention kernel.

    python train.py config/sliding_window.py      # a plain decoder (chunk_size=0) whose tokens see 48 positions

The other baselines need no code of their own: full attention is `ModelConfig(chunk_size=0)`, the
ablations are settings (docs/ablations.md), and the truncated decoder RAM is compared with reads the last
tokens of its context (ram/train_ram.py, truncate_keep).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, block: int = 256) -> Tensor:
    """Causal attention where the query at position p sees only keys p-window+1..p. q (B, nh, T, hs) are
    the last T of the S keys. Queries go in blocks, each with just the keys its window reaches, so work
    and memory grow with T * (block + window), not T * S."""
    T, S = q.size(2), k.size(2)
    out = []
    for a in range(0, T, block):
        b = min(a + block, T)
        lo, hi = max(0, S - T + a - window + 1), S - T + b  # keys the block's first and last queries reach
        qpos = torch.arange(S - T + a, hi, device=q.device)[:, None]
        kpos = torch.arange(lo, hi, device=q.device)[None]
        mask = (kpos <= qpos) & (kpos > qpos - window)  # (b - a, hi - lo)
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=mask))
    return torch.cat(out, 2)
