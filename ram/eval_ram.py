"""Accuracy of RAM (docs/design.md, S9) and of what it is compared with, on RAM's tasks, over eval_passkey.py's grid
of lengths x depths (every eval_passkey.py setting applies).

    python -m ram.eval_ram --ckpt out/ram_facts/ckpt.pt --keep_ratio 0.125   # RAM at 8x
    python -m ram.eval_ram --ckpt out/truncate_facts/ckpt.pt                 # the truncated decoder
    python -m ram.eval_ram --ckpt out/ram_facts/ckpt.pt --method truncate    # RAM's decoder alone, truncated
    python -m ram.eval_ram --ckpt out/recall_comet/ckpt.pt                   # CoMeT, on the task it trained on

Methods: ram reads each context through RAM's compression for its question (`RAM.answer`); truncate gives a plain
decoder only the context's last tokens that fit RAM's budget; comet reads the whole sequence (stream.ask).
"""
from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch

import eval_passkey
from eval_passkey import checkpoint_path, count_right
from checkpoint import read_checkpoint
import configurator
from configurator import configure_or_exit, pick_device, settings_of
from data import by_shape, get_tokenizer
from ram.ram import RAMConfig, budget, groups, load_ram
from ram.tasks import TASKS, maker
from ram.train_ram import METHODS
from stream import ask

SETTINGS = {**settings_of(vars(eval_passkey)),
            "method": "auto",    # auto (as trained) | comet | ram | truncate
            "task": "auto",      # auto (as trained) | passkey | facts | recall | needle
            "keep_ratio": 0.0}   # ram, truncate: the share of the context read closely; 0 = as trained
RULES = {**configurator.RULES, "keep_ratio": "in [0, 1]"}  # the settings' ranges (keep_ratio 0: as trained)


def open_any(cfg: dict) -> tuple:
    """A RAM checkpoint (its settings record ram_args), else what eval_passkey.open_model opens."""
    path = checkpoint_path(cfg["ckpt"])
    if cfg["init_from"] or not path.endswith(".pt") or "ram_args" not in read_checkpoint(path):
        return eval_passkey.open_model(cfg)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    model, ckpt = load_ram(path, pick_device(cfg["device"]))
    return model, get_tokenizer(ckpt["config"].get("tokenizer", "bytes")), ckpt["config"], pick_device(cfg["device"])


def resolve(cfg: dict, model, train: dict) -> tuple[str, str, RAMConfig]:
    """(method, task, RAM's settings): as asked, or as the checkpoint was trained; one clear error for a mismatch."""
    trained = "ram" if hasattr(model, "ram") else train.get("method", "comet")
    how = trained if cfg["method"] == "auto" else cfg["method"]
    what = train.get("task", "passkey") if cfg["task"] == "auto" else cfg["task"]
    if how not in METHODS or what not in TASKS:
        raise ValueError(f"method={how!r} must be one of {', '.join(METHODS)}; task={what!r} one of {', '.join(TASKS)}")
    if (how == "ram") != (trained == "ram"):
        raise ValueError(f"method={how} needs {'a RAM' if how == 'ram' else 'a CoMeT or plain decoder'} checkpoint; "
                         f"{cfg['ckpt']} was trained with method={trained}")
    if how == "truncate" and getattr(model, "decoder", model).config.comet:
        raise ValueError("method=truncate needs a plain decoder (chunk_size=0) or a RAM checkpoint")
    ram = model.ram if how == "ram" else RAMConfig(segment=train.get("segment", 50),
                                                   keep_ratio=train.get("keep_ratio", 0.25))
    return how, what, dataclasses.replace(ram, keep_ratio=cfg["keep_ratio"] or ram.keep_ratio)


@torch.no_grad()
def ram_cell(model, samples: list, ram: RAMConfig, tokens_right: list) -> int:
    """How many of `samples` RAM answers exactly, each context compressed for its question."""
    correct = 0
    for query, context, answer, _ in groups(samples, model.ram.segment, next(model.parameters()).device):
        correct += count_right(model.answer(query, context, answer.size(1), ram.keep_ratio) == answer, tokens_right)
    return correct


@torch.no_grad()
def truncate_cell(decoder, samples: list, ram: RAMConfig, tokens_right: list, piece: int) -> int:
    """How many of `samples` a plain decoder answers exactly from the context's last tokens that fit RAM's budget,
    then the question."""
    correct, device = 0, next(decoder.parameters()).device
    for (n_context, _, n_answer), group in by_shape(samples).items():
        start = n_context - budget(n_context, ram)
        tokens = lambda a, b: torch.from_numpy(np.stack([s.tokens(start + a, start + b) for s in group])).to(device)
        out, _ = ask(decoder, tokens, group[0].length - n_answer - start, n_answer, piece=piece)
        correct += count_right(out == torch.from_numpy(np.stack([s.answer for s in group])).to(device), tokens_right)
    return correct


def main() -> None:
    cfg = configure_or_exit(SETTINGS, rules=RULES)
    try:
        if cfg["state"] or cfg["asks"] != 1 or cfg["perplexity"]:
            raise ValueError("--state, --asks and --perplexity are eval_passkey.py's: RAM's tasks are read whole")
        opened = open_any(cfg)
        how, what, ram = resolve(cfg, opened[0], opened[2])
        make, enc, digits = maker(what), opened[1], opened[2].get("digits", 5)

        def rows(n: int) -> int:  # what the decoder reads of n tokens: all, or RAM's budget, the question, the answer
            s = make(enc, n, 0.5, random.Random(0), digits)
            return n if how == "comet" else budget(s.n_context, ram) + len(s.question) + len(s.answer)
        r = eval_passkey.prepare(cfg, opened, make, rows)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    model = r.model.decoder if how == "truncate" and hasattr(r.model, "decoder") else r.model
    cells = {"ram": lambda s, right, _: ram_cell(model, s, ram, right),
             "truncate": lambda s, right, _: truncate_cell(model, s, ram, right, cfg["piece"]),
             "comet": lambda s, right, sec: eval_passkey.passkey_cell(model, s, cfg["chunk_align"], cfg["piece"], right)}
    r = r._replace(record={**r.record, "task": what, "method": how,
                           "keep_ratio": ram.keep_ratio if how != "comet" else None})
    print(f"evaluating {r.record['model']} on {r.device}: {what} task, method {how}"
          f"{f', keep_ratio {ram.keep_ratio}' if how != 'comet' else ''}, {len(r.lens)} lengths x {len(r.deps)} "
          f"depths x {cfg['trials']} trials")
    eval_passkey.grid(r, cfg, cells[how])


if __name__ == "__main__":
    main()
