"""RAM, "Read As Human" (docs/design.md, S9): query-aware context compression by close reading and skimming.

CoMeT (model.py, stream.py) streams a context without knowing the question; RAM knows the question first:
  1. cut the context into segments of `segment` tokens;
  2. encode every segment with the query in front of it (the paper; or the query and each segment as rows
     of their own, the authors' latest code: RAMConfig.query), all segments as one batch (no attention
     across segments); a representation is the mean of last-layer states (or the first encoder_layers');
  3. cosine(query, segment) ranks the segments; the top k are kept as their tokens (close reading);
  4. every other segment becomes one vector: its token states weighted by a softmax over their cosine
     with the query, summed, then mapped by a d x d alignment (skimming);
  5. the decoder reads kept tokens and skim vectors in the original order, then the query, and answers;
  6. training adds a multi-positive InfoNCE between the query and the segments that hold the answer.
Reading order: RAMConfig -> segments -> RAM.encode -> select/skim -> reading_order -> RAM.loss / RAM.answer,
then batches and loading (ram/train_ram.py and ram/eval_ram.py build on them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from checkpoint import load_weights, read_checkpoint
from configurator import check_types
from data import by_shape
from model import ModelConfig, Transformer


QUERY_MODES = ("front", "alone")


@dataclass
class RAMConfig:
    segment: int = 50              # tokens per segment (the paper's 50)
    keep_ratio: float = 0.25       # share of the context kept as tokens: 0.25 ~ 4x compression, 0.125 ~ 8x
    shared: bool = True            # the encoder is the decoder (one set of weights)
    temperature: float = 0.05      # InfoNCE temperature
    contrast_weight: float = 1.0   # lambda: loss = answer NLL + lambda * InfoNCE
    query: str = "front"           # front: the query in front of every segment (paper); alone: the query and
                                   # each segment encoded as rows of their own (the authors' latest code)
    encoder_layers: int = 0        # the encoder is the first k layers (authors: 8 of the base's); 0: all

    def __post_init__(self):
        check_types(self)
        for name, ok, rule in (("segment", self.segment > 0, "> 0"), ("temperature", self.temperature > 0, "> 0"),
                               ("contrast_weight", self.contrast_weight >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"RAMConfig: {name}={getattr(self, name)} must be {rule}")
        if self.query not in QUERY_MODES:
            raise ValueError(f"RAMConfig: query={self.query!r} must be one of {', '.join(QUERY_MODES)}")
        if self.encoder_layers < 0:
            raise ValueError(f"RAMConfig: encoder_layers={self.encoder_layers} must be >= 0 (0: all layers)")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"RAMConfig: keep_ratio={self.keep_ratio} must lie in (0, 1]")



def n_keep(n_tokens: int, segment: int, keep_ratio: float) -> int:
    """Segments read closely: the kept tokens are keep_ratio of the context (the paper's k = L / (alpha L_seg)),
    at least one, at most all."""
    return min(math.ceil(n_tokens / segment), max(1, math.floor(keep_ratio * n_tokens / segment)))


def budget(n_tokens: int, cfg: RAMConfig, keep_ratio: float | None = None) -> int:
    """Decoder rows RAM spends on a context of n_tokens: k whole segments + one vector per other segment.
    The truncated baseline gets this many of the context's last tokens (when RAM keeps the short last
    segment it reads a few rows fewer)."""
    n_seg = math.ceil(n_tokens / cfg.segment)
    k = n_keep(n_tokens, cfg.segment, keep_ratio or cfg.keep_ratio)
    return min(n_tokens, k * cfg.segment + n_seg - k)


def segments(context: Tensor, segment: int) -> tuple[Tensor, Tensor]:
    """context (B, N) -> tokens (B, S, segment) and their mask; the last segment is padded at its end."""
    B, N = context.shape
    S = math.ceil(N / segment)
    tokens = F.pad(context, (0, S * segment - N)).view(B, S, segment)
    mask = (torch.arange(S * segment, device=context.device) < N).view(1, S, segment).expand(B, S, segment)
    return tokens, mask


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (..., T, C) over the T rows where mask (..., T) is True."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


def select(scores: Tensor, k: int) -> Tensor:
    """S9.3: bool (B, S), True at the k highest-scoring segments of each row (close reading)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter(1, scores.topk(k, dim=1).indices, True)


def close_read(score: torch.Tensor, parts: list[tuple[int, int]], budget: int) -> list[int]:
    """S9.3 for segments of varied length (ram.needle's sentences): the best-scoring segments whose tokens fit the
    budget together (each taken if it still fits), in their original order (S9.5). `select` is RAM's own, for
    segments of one length: the k best."""
    kept, used = [], 0
    for i in score.argsort(descending=True).tolist():
        if used + parts[i][1] - parts[i][0] <= budget:
            kept.append(i)
            used += parts[i][1] - parts[i][0]
    return sorted(kept)


def skim_weights(states: Tensor, mask: Tensor, q_rep: Tensor) -> Tensor:
    """S9.4: softmax over each segment's real tokens of cosine(token state, query). states (B, S, seg, C),
    mask (B, S, seg), q_rep (B, C) -> (B, S, seg), each segment's weights summing to 1."""
    cos = F.cosine_similarity(states, q_rep[:, None, None, :], dim=-1)
    return cos.masked_fill(~mask, -float("inf")).softmax(-1)


def info_nce(q_rep: Tensor, seg_rep: Tensor, positives: Tensor, temperature: float) -> Tensor:
    """S9.6: multi-positive InfoNCE, -log(sum_pos exp(cos/t) / sum_all exp(cos/t)), averaged over the rows
    that have a positive; rows without one are skipped (0 if none has). positives: bool (B, S)."""
    logits = F.cosine_similarity(seg_rep, q_rep[:, None, :], dim=-1) / temperature  # (B, S)
    has = positives.any(1)
    if not has.any():
        return logits.sum() * 0.0  # keeps the graph: a batch without positives adds nothing
    logits, positives = logits[has], positives[has]
    return (logits.logsumexp(1) - logits.masked_fill(~positives, -float("inf")).logsumexp(1)).mean()


def reading_order(keep: Tensor, n_tokens: int, segment: int) -> Tensor:
    """S9.5: one row's decoder input as indices into cat(context tokens (N), skim vectors (S)): a kept
    segment's tokens, or a skimmed segment's one vector, segment after segment in the original order."""
    seg_of = torch.arange(n_tokens, device=keep.device) // segment
    tokens = torch.nonzero(keep[seg_of]).flatten()
    skims = torch.nonzero(~keep).flatten()
    order = torch.cat([seg_of[tokens], skims]).argsort(stable=True)  # a segment is all tokens or one vector
    return torch.cat([tokens, n_tokens + skims])[order]


class RAM(nn.Module):
    """An encoder and a decoder (model.py's plain decoder; shared by default) and the d x d alignment."""

    def __init__(self, config: ModelConfig, ram: RAMConfig):
        super().__init__()
        if config.comet:
            raise ValueError("RAM reads with a plain decoder: set chunk_size=0")
        if ram.encoder_layers > config.n_layer:
            raise ValueError(f"encoder_layers={ram.encoder_layers} exceeds the model's n_layer={config.n_layer}")
        self.config, self.ram = config, ram
        self.decoder = Transformer(config)
        if not ram.shared:
            self.own_encoder = Transformer(config)
        self.align = nn.Linear(config.n_embd, config.n_embd, bias=False)  # S9.4: skim vectors -> decoder inputs
        nn.init.normal_(self.align.weight, std=config.init_std)

    @property
    def encoder(self) -> Transformer:
        return self.decoder if self.ram.shared else self.own_encoder

    @staticmethod
    def is_memory_param(name: str) -> bool:  # train.py's optimizer asks; RAM has no CoMeT memories
        return False

    @staticmethod
    def hidden(net: Transformer, x: Tensor, past: list | None = None,
               n_layers: int | None = None) -> tuple[Tensor, list]:
        """Input rows x (B, T, C) through every block of net, then its final norm: last-layer states
        (B, T, C) and each layer's keys/values (to continue the same rows later, `past`). With n_layers
        (< all): the first n_layers blocks' output as it is (the residual stream; no final norm)."""
        h, cache = net.run_blocks(x, past, n_layers)
        return (net.norm(h) if len(cache) == len(net.layers) else h), cache

    def encode(self, query: Tensor, context: Tensor,
               rows_per_pass: int = 4096) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """S9.2: every segment encoded as a batch (no attention across segments), rows_per_pass segments per
        encoder call; the states are the last layer's, or the first encoder_layers'. query (B, Q), context
        (B, N) -> q_rep (B, C), seg_rep (B, S, C), token states (B, S, seg, C), mask (B, S, seg); the
        representations are mean-pooled states. RAMConfig.query chooses how the query enters:
        - front (the paper): the query in front of every segment. With causal attention the query's rows
          are the same in front of every segment, so they run once and every segment attends to their
          keys/values: the result of [query; segment] rows, at a fraction of the work;
        - alone (the authors' latest code): the query is a row of its own, and so is every segment."""
        tokens, mask = segments(context, self.ram.segment)
        B, S, seg = tokens.shape
        front = self.ram.query == "front"
        Q, limit = query.size(1), self.config.block_size
        if (Q + seg if front else max(Q, seg)) > limit:  # front: one row holds both; alone: each its own row
            raise ValueError(f"query ({Q}) + segment ({seg}) tokens exceed block_size={limit}" if front else
                             f"the query ({Q} tokens) or a segment ({seg}) exceeds block_size={limit}")
        emb, k = self.encoder.tok_embeddings, self.ram.encoder_layers or None
        q_states, q_kv = self.hidden(self.encoder, emb(query), n_layers=k)  # (B, Q, C); per layer (B, n_kv, Q, hs)
        rows = tokens.flatten(0, 1)  # (B*S, seg): row r is segment r % S of sample r // S
        states = []
        for a in range(0, B * S, rows_per_pass):  # front: the query's keys/values, copied for this pass's rows
            sample = torch.arange(a, min(a + rows_per_pass, B * S), device=rows.device) // S
            past = [tuple(t[sample] for t in kv) for kv in q_kv] if front else None
            states.append(self.hidden(self.encoder, emb(rows[a:a + rows_per_pass]), past, k)[0])
        states = torch.cat(states).view(B, S, seg, -1)
        return q_states.mean(1), masked_mean(states, mask), states, mask

    def compress(self, query: Tensor, context: Tensor,
                 keep_ratio: float | None = None) -> tuple[list, list, Tensor, Tensor, Tensor]:
        """S9.2-5: the decoder's context rows. Returns per row (list of B) the input rows (L_b, C) and the
        token id behind each row (-1 for a skim vector), plus q_rep, seg_rep and the kept mask (B, S)."""
        q_rep, seg_rep, states, mask = self.encode(query, context)
        N, seg = context.size(1), self.ram.segment
        keep = select(F.cosine_similarity(seg_rep, q_rep[:, None], dim=-1),
                      n_keep(N, seg, keep_ratio or self.ram.keep_ratio))
        w = skim_weights(states, mask, q_rep)
        skims = self.align((w.unsqueeze(-1) * states).sum(2))  # (B, S, C)
        tok = self.decoder.tok_embeddings(context)             # (B, N, C)
        rows, ids = [], []
        for b in range(context.size(0)):
            order = reading_order(keep[b], N, seg)
            rows.append(torch.cat([tok[b], skims[b]])[order])
            ids.append(torch.cat([context[b], context.new_full((keep.size(1),), -1)])[order])
        return rows, ids, q_rep, seg_rep, keep

    def loss(self, query: Tensor, context: Tensor, answer: Tensor, positives: Tensor,
             lm_weight: float = 0.0) -> tuple[Tensor, dict]:
        """S9.6: answer NLL (+ lm_weight x NLL of the other next tokens the decoder reads) + lambda x InfoNCE.
        query (B, Q), context (B, N), answer (B, A), positives bool (B, S). Returns (loss, parts): the
        terms, and `recall`, the share of rows with a positive whose positive segment was kept."""
        rows, ids, q_rep, seg_rep, keep = self.compress(query, context)
        emb = self.decoder.tok_embeddings
        tail = torch.cat([query, answer], 1)  # (B, Q + A): read after the context rows
        n = max(len(r) for r in rows) + tail.size(1)
        x = rows[0].new_zeros(len(rows), n - 1, rows[0].size(1))
        seq = tail.new_full((len(rows), n), -1)                     # token id per position, -1: none
        for b, (r, i) in enumerate(zip(rows, ids)):                  # right padding: causal rows never see it
            L = len(r) + tail.size(1)
            x[b, :L - 1] = torch.cat([r, emb(tail[b, :-1])])
            seq[b, :L] = torch.cat([i, tail[b]])
        h, _ = self.hidden(self.decoder, x)
        logits = self.decoder.output(h).float()                     # (B, n-1, V)
        targets = seq[:, 1:]
        lengths = torch.tensor([len(r) + tail.size(1) for r in rows], device=x.device)
        pos = torch.arange(n - 1, device=x.device)
        is_answer = (pos >= lengths[:, None] - 1 - answer.size(1)) & (pos < lengths[:, None] - 1)
        nll = F.cross_entropy(logits.flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
        nll = nll.view_as(targets)
        parts = dict(answer=nll[is_answer].mean())
        other = (targets >= 0) & ~is_answer
        parts["lm"] = nll[other].mean() if other.any() else nll.sum() * 0
        parts["contrast"] = info_nce(q_rep, seg_rep, positives, self.ram.temperature)
        has = positives.any(1)
        parts["recall"] = (keep & positives).any(1)[has].float().mean() if has.any() else torch.ones(())
        loss = parts["answer"] + lm_weight * parts["lm"] + self.ram.contrast_weight * parts["contrast"]
        return loss, parts

    @torch.no_grad()
    def answer(self, query: Tensor, context: Tensor, n_new: int, keep_ratio: float | None = None) -> Tensor:
        """Greedy answer (B, n_new) to query about context, read through RAM's compression."""
        rows, _, _, _, _ = self.compress(query, context, keep_ratio)
        emb, out = self.decoder.tok_embeddings, torch.zeros(len(rows), n_new, dtype=torch.long,
                                                            device=context.device)
        lengths = torch.tensor([len(r) for r in rows])
        if lengths.max() + query.size(1) + n_new > self.config.block_size:
            raise ValueError(f"the decoder would read {int(lengths.max()) + query.size(1) + n_new} rows, more than "
                             f"block_size={self.config.block_size}: raise it (positions beyond training are "
                             "extrapolated)")
        for L in lengths.unique().tolist():  # rows of equal length decode together (a kept last segment
            group = torch.nonzero(lengths == L).flatten().tolist()  # may be shorter than the others)
            x = torch.cat([torch.stack([rows[b] for b in group]), emb(query[group])], 1)
            h, past = self.hidden(self.decoder, x)
            for t in range(n_new):
                nxt = self.decoder.output(h[:, -1]).argmax(-1)
                out[group, t] = nxt
                if t + 1 < n_new:
                    h, past = self.hidden(self.decoder, emb(nxt[:, None]), past)
        return out


# --- batches and loading -------------------------------------------------------------------------

def positives(evidence: list[tuple[int, int]], n_tokens: int, segment: int) -> Tensor:
    """bool (B, S): segments overlapping each row's evidence span [start, end), the sentence holding the answer
    (the paper: segments containing the answer; here a segment with only part of that sentence counts too,
    which for the facts task keeps the name and its code together)."""
    S = math.ceil(n_tokens / segment)
    first = torch.arange(S) * segment
    return torch.stack([(first < end) & (first + segment > start) for start, end in evidence])



def groups(samples: list, segment: int, device) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """data.Passkey samples -> (query, context, answer, positives) tensors, one tuple per shape."""
    out = []
    for (n, _, _), group in by_shape(samples).items():
        rows = lambda xs: torch.from_numpy(np.stack(xs)).to(device)
        out.append((rows([s.question for s in group]), rows([s.tokens(0, n) for s in group]),
                    rows([s.answer for s in group]), positives([s.evidence for s in group], n, segment).to(device)))
    return out



def load_ram(path: str, device: str = "cpu", ckpt: dict | None = None) -> tuple[RAM, dict]:
    """A RAM checkpoint (model_args + ram_args) -> (RAM in eval mode, ckpt); built on the meta device."""
    ckpt = ckpt if ckpt is not None else read_checkpoint(path)
    try:
        cfg, ram = ModelConfig(**ckpt["model_args"]), RAMConfig(**ckpt["ram_args"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_args or ram_args: {e}") from None
    if cfg.comet:
        raise ValueError(f"{path}: bad model_args: a RAM checkpoint needs chunk_size=0")
    with torch.device("meta"):
        model = RAM(cfg, ram)
    return load_weights(model, ckpt["model"], path).to(device).eval(), ckpt
