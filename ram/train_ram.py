"""Train RAM (docs/design.md, S9), and what it is compared with, on RAM's tasks through train.py's loop: this entry
point hands `train.main` the model, its batches, its loss and its evaluation; every train.py setting applies.

    python -m ram.train_ram config/ram_passkey.py --out_dir=out/ram_passkey               # RAM 4x on passkeys
    python -m ram.train_ram config/recall.py --method=truncate --chunk_size=0 --out_dir=out/recall_truncate
    python -m ram.train_ram config/recall.py --method=comet --out_dir=out/recall_comet       # CoMeT on recall

Methods: ram (S9: segments, close reading and skimming, InfoNCE); truncate (a plain decoder that reads only the
context's last tokens that fit RAM's budget); comet (train.py's CoMeT or plain decoder, on RAM's tasks).
"""
from __future__ import annotations

import dataclasses
import os
import random

import torch

import train
from configurator import check_ranges
from data import filler_tokens, make_passkey
from model import ModelConfig
from ram.ram import RAM, RAMConfig, budget, groups, load_ram
from ram.tasks import TASKS, maker

METHODS = ("comet", "ram", "truncate")
# the settings RAM's runs add to train.py's, e.g. `python -m ram.train_ram --segment=50` (-> RAMConfig)
SETTINGS = dict(
    method="ram",           # ram (S9) | truncate (a plain decoder on RAM's budget of last tokens) | comet (train.py's)
    task="passkey",         # passkey | facts | recall | needle (ram/tasks.py)
    segment=50,             # RAM: tokens per segment
    keep_ratio=0.25,        # share of the context read closely (0.25 ~ 4x compression); truncate: the same budget
    ram_shared=True,        # RAM: encoder and decoder share weights
    contrast_weight=0.1,    # RAM: lambda of the InfoNCE term (the paper's 1 stalled the tiny model: docs/ram.md)
    temperature=0.05,       # RAM: InfoNCE temperature
    ram_query="front",      # RAM: front (the query in front of every segment: the paper) | alone (the query and
                            # every segment as rows of their own: the authors' latest code)
    encoder_layers=0,       # RAM: the encoder is the first k layers (the authors' code: 8); 0: all
)
DEFAULTS = {**train.DEFAULTS, **SETTINGS}
FROZEN = ("method", "task", "segment", "keep_ratio", "ram_shared", "ram_query", "encoder_layers",
          "contrast_weight", "temperature")  # on resume


def config_of(c: dict) -> RAMConfig:
    """RAMConfig from the settings (one clear error for a bad value)."""
    return RAMConfig(segment=c["segment"], keep_ratio=c["keep_ratio"], shared=c["ram_shared"], query=c["ram_query"],
                     contrast_weight=c["contrast_weight"], temperature=c["temperature"],
                     encoder_layers=c["encoder_layers"])


def check_settings(c: dict, enc) -> None:
    """What only RAM's runs need; one clear error now instead of deep inside the run."""
    check_ranges(c, {"temperature": "> 0"})  # InfoNCE's, not sampling's (configurator.RULES: >= 0, 0 = greedy)
    if c["method"] not in METHODS or c["task"] not in TASKS:
        raise ValueError(f"method={c['method']!r} must be one of {', '.join(METHODS)}; task={c['task']!r} one of "
                         f"{', '.join(TASKS)}")
    config_of(c)
    question = maker(c["task"])(enc, c["min_len"], 0.5, random.Random(0), c["digits"],  # too short?
                                filler_tokens(enc, c["filler"], "train")).question
    if c["method"] == "comet":
        return
    if c["chunk_size"]:
        raise ValueError(f"method={c['method']} reads with a plain decoder: set chunk_size=0")
    if c["pipeline"] or c["dp"] > 1 or c["init_from"] not in ("scratch", "resume"):
        raise ValueError(f"method={c['method']} trains from scratch in one process (no pipeline, dp or Llama)")
    if c["method"] == "ram" and c["ckpt_shards"]:
        raise ValueError("method=ram saves one ckpt.pt: set ckpt_shards=False")
    if c["method"] == "ram" and c["segment"] + len(question) > max(c["max_len"], 1024):
        raise ValueError(f"segment={c['segment']} + the question's {len(question)} tokens exceed the decoder's "
                         f"{max(c['max_len'], 1024)} positions: use a shorter segment")


def truncate_keep(samples: list, cfg: RAMConfig) -> int:
    """method=truncate: how many of the sequences' last tokens a plain decoder reads: the context's last tokens that
    fit RAM's budget, then the question and answer (rows with a shorter question keep a few more)."""
    n_context = min(s.n_context for s in samples)
    return samples[0].length - n_context + budget(n_context, cfg)


def ram_loss(model: RAM, batch: list, lm_weight: float) -> tuple[torch.Tensor, dict]:
    """`RAM.loss` of every group of the batch (`groups`), weighted by its rows; the terms averaged alike, to log."""
    n, loss, parts = sum(g[0].size(0) for g in batch), 0.0, {}
    for g in batch:
        term, terms = model.loss(*g, lm_weight=lm_weight)
        loss = loss + term * (g[0].size(0) / n)
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + v.item() * (g[0].size(0) / n)
    return loss, parts


@torch.no_grad()
def ram_accuracy(model: RAM, enc, make, keep_ratio: float) -> float:
    """Exact match of RAM's greedy answers (`RAM.answer`) on train.py's evaluation sequences."""
    model.eval()
    right = n = 0
    for samples in train.eval_samples(enc, make):
        for query, context, answer, _ in groups(samples, model.ram.segment, next(model.parameters()).device):
            right += int((model.answer(query, context, answer.size(1), keep_ratio) == answer).all(1).sum())
            n += query.size(0)
    model.train()
    return right / n


def recipe(config: dict, enc, ckpt: dict | None, dev: str, pipe) -> train.Recipe:
    """The method's model, batches, loss and evaluation on the task's sequences."""
    check_settings(config, enc)
    make, cfg = maker(config["task"]) if config["task"] != "passkey" else make_passkey, config_of(config)
    if config["method"] != "ram":  # train.py's model, on this task's sequences (truncate: their last tokens)
        model, record = train.build_model(config, enc, ckpt, dev)
        keep = (lambda s: truncate_keep(s, cfg)) if config["method"] == "truncate" else (lambda s: 0)

        def batch(it: int) -> tuple:
            samples, length = train.get_samples(enc, it, pipe.dp_rank if pipe else 0, make)
            return (*train.lm_batch(samples, dev, train.batch_align(it), keep(samples)), length)

        return train.Recipe(model, batch, lambda m, b, rows=slice(None): train.lm_loss(m, b, pipe, rows),
                            lambda m: train.evaluate(m, enc, make, keep), record, config["batch_threads"] if pipe is None else 1)
    if ckpt is not None:
        model = load_ram(os.path.join(config["out_dir"], "ckpt.pt"), dev, ckpt)[0].train()
    else:  # the decoder's RoPE covers the longest sequence it may read
        model = RAM(ModelConfig(vocab_size=enc.n_vocab, block_size=max(config["max_len"], 1024),
                                **{k: config[k] for k in train.MODEL_KEYS}), cfg).to(dev)

    def ram_batch(it: int) -> tuple:
        samples, length = train.get_samples(enc, it, make=make)
        batch = groups(samples, cfg.segment, dev)
        return batch, sum(t.numel() for g in batch for t in g[:3]), length  # question + context + answer

    return train.Recipe(model, ram_batch, lambda m, b: ram_loss(m, b, config["lm_weight"]),
                        lambda m: ram_accuracy(m, enc, make, cfg.keep_ratio), {"ram_args": dataclasses.asdict(model.ram)})


if __name__ == "__main__":
    train.main(recipe, DEFAULTS, FROZEN)
