"""RAM's tasks (docs/design.md, S9): several facts hidden in the filler with one asked (facts, recall), and one
fact in real English asked as a plain completion (needle); and the passkey (data.py, S8), so that every method
reads every task alike. Each builds a `data.Passkey` sequence (filler with hidden sentences, a question, the answer).

    samples = sample_batch(enc, 8, 512, seed=0, make=maker("facts"))
"""
from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import tiktoken

from data import Passkey, encode, hide, make_passkey

FACT = "{name}'s code is {key}. "
FACT_QUESTION = "What is {name}'s code? {name}'s code is"
# five letters each, so that with the byte tokenizer every question of a batch has the same length
NAMES = ("Alice", "Bruno", "Carla", "Diego", "Elena", "Fiona", "Gavin", "Helen", "Irene", "James", "Karen",
         "Laura", "Mason", "Nadia", "Oscar", "Paula", "Quinn", "Rosie", "Simon", "Tanya", "Wendy",
         "Yusuf", "Zelda", "Amber", "Boris", "Chloe", "Daisy", "Ethan", "Felix", "Grace")
# multi-query associative recall with a question (task "recall"): a fact is a code whose first character, its
# key, is one token (a capital letter that S8's filler never uses) right in front of the digits, and the question
# ends with that key, so that a small decoder finds the answer by one induction step (key -> next token)
RECALL_KEYS = "ABCDEFGIJKLMNOPQRSUVWXYZ"
RECALL_FACT = "{key}{value}. "
RECALL_QUESTION = "Which code starts with {key}? {key}"
# a fact in real English, asked as a plain completion (needle.py: RAM on a pretrained model, no training)
NEEDLE = "The secret code of the {color} {thing} is {key}."
NEEDLE_QUESTION = "The secret code of the {color} {thing} is"
COLORS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden")
THINGS = ("door", "box", "car", "house", "boat", "bird", "lamp", "chair", "garden", "tower")
TASKS = ("passkey", "facts", "recall", "needle")


def make_facts(enc: tiktoken.Encoding, length: int, depth: float, rng: random.Random, digits: int = 5,
               n_facts: int = 4, filler: np.ndarray | None = None) -> Passkey:
    """Several facts "Name's code is K." hidden in the filler; the question asks for one person's code.
    The asked fact sits at relative depth `depth`, the others at uniform random depths; names and codes
    are distinct, so only the matching name gives the answer."""
    if not 1 <= n_facts <= len(NAMES):
        raise ValueError(f"n_facts={n_facts} must lie in [1, {len(NAMES)}]")
    names = rng.sample(NAMES, n_facts)
    keys = [str(k) for k in rng.sample(range(10 ** (digits - 1), 10 ** digits), n_facts)]
    sep = "" if filler is None else "\n"  # real text: each fact and the question start a line of their own
    sentences = encode(enc, *(sep + FACT.format(name=n, key=k) for n, k in zip(names, keys)))
    question, answer = encode(enc, sep + FACT_QUESTION.format(name=names[0]), " " + keys[0])
    depths = [depth] + [rng.random() for _ in names[1:]]
    return hide(enc, length, depth, rng, sentences, depths, question, answer, filler)


def make_recall(enc: tiktoken.Encoding, length: int, depth: float, rng: random.Random, digits: int = 5,
                n_facts: int = 8, filler: np.ndarray | None = None) -> Passkey:
    """Facts "K48213." (K one of RECALL_KEYS, a single token) hidden in the filler; the question "Which code
    starts with K? K" asks for one of them, the answer is its digits. The asked fact sits at relative depth
    `depth`, the others at uniform random depths; keys and values are distinct, and every fact has the form
    the question asks about, so only the key tells them apart."""
    if not 1 <= n_facts <= len(RECALL_KEYS):
        raise ValueError(f"n_facts={n_facts} must lie in [1, {len(RECALL_KEYS)}]")
    keys = rng.sample(RECALL_KEYS, n_facts)
    values = [str(v) for v in rng.sample(range(10 ** (digits - 1), 10 ** digits), n_facts)]
    sep = "" if filler is None else "\n"
    sentences = encode(enc, *(sep + RECALL_FACT.format(key=k, value=v) for k, v in zip(keys, values)))
    question, answer = encode(enc, sep + RECALL_QUESTION.format(key=keys[0]), values[0])
    depths = [depth] + [rng.random() for _ in keys[1:]]
    return hide(enc, length, depth, rng, sentences, depths, question, answer, filler)


def make_needle(enc: tiktoken.Encoding, length: int, depth: float, rng: random.Random, digits: int = 5,
                filler: np.ndarray | None = None) -> Passkey:
    """One fact "The secret code of the blue door is 48213." (a random colour, thing and code) on a line of
    its own at relative depth `depth` of the filler, then the question as a plain completion on a new line."""
    color, thing, key = rng.choice(COLORS), rng.choice(THINGS), str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    sentence, question, answer = encode(enc, "\n" + NEEDLE.format(color=color, thing=thing, key=key) + "\n",
                                         "\n" + NEEDLE_QUESTION.format(color=color, thing=thing), " " + key)
    return hide(enc, length, depth, rng, [sentence], [depth], question, answer, filler)


def make_sample(task: str, enc: tiktoken.Encoding, length: int, depth: float, rng: random.Random,
                digits: int = 5, filler: np.ndarray | None = None) -> Passkey:
    """One sequence of `task` (one of TASKS); filler: token ids (`filler_tokens`), None: FILLER."""
    if task == "passkey":
        return make_passkey(enc, length, depth, rng, digits, filler)
    if task == "facts":
        return make_facts(enc, length, depth, rng, digits, filler=filler)
    if task == "recall":
        return make_recall(enc, length, depth, rng, digits, filler=filler)
    if task == "needle":
        return make_needle(enc, length, depth, rng, digits, filler)
    raise ValueError(f"task={task!r} must be one of {', '.join(TASKS)}")


def maker(task: str) -> Callable[..., Passkey]:
    """`make_sample` of one task, as data.sample_batch's `make` takes it."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {', '.join(TASKS)}")
    return lambda enc, length, depth, rng, digits=5, filler=None: make_sample(task, enc, length, depth, rng, digits,
                                                                             filler)
