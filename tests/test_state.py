"""Read once, ask many times: a stream state written to a file and loaded again is the stream itself (S6)."""
import json
import os
import pickle
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

import eval_passkey
from checkpoint import load_model, save_checkpoint
from configurator import settings_of
from conftest import plan_logits, tiny_model
from data import get_tokenizer, make_passkey
from eval_passkey import passkey_cell
from sample import answer
from stream import _checksum, check_state_path, generate, load_state, new_stream, repeat_state, save_state, stream

ROOT = Path(__file__).resolve().parents[1]
ENC = get_tokenizer("bytes")


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, n), generator=torch.Generator().manual_seed(seed))


def read(model, n: int, seed: int = 0):
    """The stream state of `model` after n random tokens."""
    _, state = stream(model, tokens(n, seed=seed), new_stream(model))
    return state


@pytest.mark.parametrize("n_context", [37, 40], ids=["inside_a_chunk", "at_a_chunk_border"])
def test_a_loaded_state_continues_bitwise_like_the_unbroken_stream(model, tmp_path, n_context):
    state, question = read(model, n_context), tokens(3, seed=1)
    save_state(str(tmp_path / "s"), model, state, ENC, n_context)
    loaded, header = load_state(str(tmp_path / "s"), model, ENC)
    assert header["tokens_read"] == n_context and same_state(loaded, state)
    logits, _ = stream(model, question, state)
    assert torch.equal(stream(model, question, loaded)[0], logits)
    # 20 greedy tokens cross at least two chunk borders (chunk_size 8): memories updated from the loaded ones
    greedy = lambda s: generate(model, question, 20, 0, state=s)[0]
    assert torch.equal(greedy(loaded), greedy(state))


def test_a_state_with_a_sink_row_in_its_cache_continues_bitwise(tmp_path):
    model = tiny_model(sink_token=0)
    state, question = read(model, 37), tokens(3, seed=1)  # 5 tokens open: the cache holds the sink, [G; T], them
    save_state(str(tmp_path / "s"), model, state, ENC, 37)
    loaded, _ = load_state(str(tmp_path / "s"), model, ENC)
    greedy = lambda s: generate(model, question, 20, 0, state=s)[0]
    assert same_state(loaded, state) and torch.equal(greedy(loaded), greedy(state))


def test_the_state_file_has_one_size_after_1k_and_after_100k_tokens(tmp_path):
    model = tiny_model(chunk_size=64)  # 1,000 and 100,000 tokens leave 40 and 32 tokens in the open chunk
    sizes = [save_state(str(tmp_path / f"{n}"), model, read(model, n), ENC, n) for n in (1000, 100_000)]
    assert sizes[0] == sizes[1] < 64 * 1024
    loaded, header = load_state(str(tmp_path / "100000"), model, ENC)
    assert header["tokens_read"] == 100_000 and loaded.tokens.size(1) == 100_000 % 64


def test_a_plain_decoder_state_is_its_kv_cache_and_loads_bitwise(tmp_path):
    model = tiny_model(chunk_size=0, block_size=64)
    state = read(model, 20)
    save_state(str(tmp_path / "s"), model, state, ENC, 20)
    loaded, _ = load_state(str(tmp_path / "s"), model, ENC)
    greedy = lambda s: generate(model, tokens(2), 10, 0, state=s)[0]
    assert torch.equal(greedy(loaded), greedy(state))


@pytest.mark.parametrize("other, names", [
    (lambda: (tiny_model(seed=1), ENC), "other weights"),
    (lambda: (tiny_model(n_global=2), ENC), "n_global=3"),
    (lambda: (tiny_model(), _Shifted()), "another tokenizer"),
], ids=["weights", "config", "tokenizer"])
def test_a_state_from_another_model_or_tokenizer_is_refused_with_one_line_naming_it(model, tmp_path, other, names):
    save_state(str(tmp_path / "s"), model, read(model, 20), ENC, 20, source="out/a/ckpt.pt")
    with pytest.raises(ValueError, match=names) as e:
        load_state(str(tmp_path / "s"), *other())
    assert "\n" not in str(e.value)


class _Shifted:
    """A tokenizer like bytes but one id off: another vocabulary."""
    n_vocab = ENC.n_vocab

    def encode_ordinary(self, text):
        return [i + 1 for i in ENC.encode_ordinary(text)]


class _Payload:
    def __reduce__(self):  # unpickling this would create a file
        return (open, (os.environ["PAYLOAD"], "w"))


def test_a_state_written_before_a_model_setting_existed_loads_as_written_with_its_default(model, tmp_path):
    path = tmp_path / "s"
    save_state(str(path), model, read(model, 20), ENC, 20)
    with safe_open(str(path), "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    config = json.loads(header["config"])
    del config["gate_bias"]  # as a state file written before the setting existed
    header = {**header, "config": json.dumps(config)}
    path.write_bytes(save(tensors, metadata={**header, "checksum": _checksum(tensors, header)}))
    assert load_state(str(path), model, ENC)[1]["tokens_read"] == 20


@pytest.mark.parametrize("damage, says", [
    ("truncated", "corrupt or truncated"), ("flipped", "checksum"), ("header", "checksum"),
    ("pickle", "corrupt or truncated"),
    ("foreign", "not a nanocomet state file"), ("missing", "no state file"),
    ("vocabulary", "token ids outside the vocabulary"), ("memories", "memories of another shape"),
])
def test_a_damaged_or_foreign_file_is_refused_with_one_line_and_runs_nothing(model, tmp_path, monkeypatch, damage,
                                                                             says):
    path, payload = tmp_path / "s", tmp_path / "ran"
    save_state(str(path), model, read(model, 20), ENC, 20)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":  # the last byte is a value of the last tensor, not the header
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    elif damage == "header":  # one digit of a count: the same length, another state
        at = data.index(b'"open_tokens":"') + len(b'"open_tokens":"') + 14
        path.write_bytes(data[:at] + (b"7" if data[at:at + 1] != b"7" else b"6") + data[at + 1:])
    elif damage == "pickle":
        monkeypatch.setenv("PAYLOAD", str(payload))
        path.write_bytes(pickle.dumps(_Payload()))
    elif damage in ("vocabulary", "memories"):  # written consistently (its checksum agrees), but not by this model
        with safe_open(str(path), "pt") as f:
            tensors, header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        if damage == "vocabulary":
            assert tensors["tokens"].numel() > 0
            tensors["tokens"][0, -1] = model.config.vocab_size
        else:
            tensors["0.temp_memory"] = torch.zeros(1, model.config.temp_budget + 1, model.config.n_embd)
        path.write_bytes(save(tensors, metadata={**header, "checksum": _checksum(tensors, header)}))
    elif damage == "foreign":
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    else:
        path.unlink()
    with pytest.raises((ValueError, FileNotFoundError), match=says) as e:
        load_state(str(path), model, ENC)
    assert "\n" not in str(e.value) and not payload.exists()


@pytest.mark.parametrize("align", ["left", "right"])  # right: 5 tokens open, short chunks of 3, 5 and 1 tokens
def test_batch_answers_equal_one_by_one_answers(model, align):
    state = read(model, 29)
    prompts = [tokens(n, seed=s) for n, s in [(3, 1), (5, 2), (3, 3), (1, 4), (3, 5)]]  # three of one length
    cfg = dict(piece=2, max_new_tokens=12, temperature=0.0, top_k=0, chunk_align=align)
    batch = answer(model, prompts, state, cfg, [0.0, 0.0])
    alone = [answer(model, [p], state, cfg, [0.0, 0.0])[0] for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(batch, alone)) and len({tuple(a.tolist()) for a in alone}) > 1


@pytest.mark.parametrize("n_context", [11, 13, 14])
def test_a_question_answered_from_a_state_right_aligned_follows_the_plan_that_ends_its_answer_with_a_chunk(model,
                                                                                                          n_context):
    question = tokens(16 - n_context, seed=1)  # 3, 5 or 6 tokens open; the short chunk takes question tokens, is
    cfg = dict(piece=65536, max_new_tokens=6, temperature=0.0, top_k=0, chunk_align="right")  # the open ones, or
    new = answer(model, [question], read(model, n_context), cfg, [0.0, 0.0])[0]  # (6,)  ends inside them
    seq = torch.cat([tokens(n_context), question, new[None]], 1)[:, :-1]  # 21 inputs: chunks 0-8, 8-13, 13-21
    full = plan_logits(model, seq, [range(0, 8), range(8, 13), range(13, 21)])
    assert torch.equal(full[0, 15:].argmax(-1), new)


@pytest.mark.parametrize("align", ["left", "right"])
def test_eval_passkey_from_a_saved_state_gives_the_answers_of_reading_it_whole(tmp_path, monkeypatch, align):
    model = tiny_model(vocab_size=ENC.n_vocab, chunk_size=16)
    answers, saved, loaded = [], [], []  # every batch of greedy answers passkey_cell scores; the states
    real_ask, real_generate = eval_passkey.ask, eval_passkey.generate
    monkeypatch.setattr(eval_passkey, "ask", lambda *a, **k: answers.append(real_ask(*a, **k)[0]) or (answers[-1], None))
    monkeypatch.setattr(eval_passkey, "generate", lambda *a, **k: answers.append(real_generate(*a, **k)[0]) or
                        (answers[-1], None))
    monkeypatch.setattr(eval_passkey, "save_state", lambda p, m, st, *a: saved.append(st) or save_state(p, m, st, *a))

    def load(*args):
        loaded.append(load_state(*args)[0])
        return loaded[-1], {}
    monkeypatch.setattr(eval_passkey, "load_state", load)
    seconds = {}
    for n, d in [(150, 0.0), (299, 1.0)]:  # contexts of 107 and 256 tokens: ending inside a chunk, at a border
        rng = random.Random(7)
        samples = [make_passkey(ENC, n, d, rng) for _ in range(3)]
        passkey_cell(model, samples, align, piece=64)
        passkey_cell(model, samples, align, piece=64, enc=ENC, state_file=str(tmp_path / "s"), asks=2, seconds=seconds)
    # per cell: the answer read whole, then the two asked from the file
    assert len(answers) == 6 and all(torch.equal(a, answers[0]) for a in answers[1:3])
    assert all(torch.equal(a, answers[3]) for a in answers[4:6])
    assert seconds["asks"] == 4 and seconds["kib"] > 0 and len(loaded) == 4
    assert all(same_state(a, b) for a, b in zip(loaded, [st for st in saved for _ in range(2)]))


def test_a_state_is_never_written_over_a_file_that_is_not_one(model, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"a checkpoint")
    for path, says in [(ckpt, "not a state file"), (tmp_path, "is a directory"), (ckpt / "x" / "s", "is a file")]:
        with pytest.raises(ValueError, match=says) as e:
            check_state_path(str(path))
        assert "\n" not in str(e.value)
    assert ckpt.read_bytes() == b"a checkpoint"
    save_state(str(tmp_path / "new" / "s"), model, read(model, 20), ENC, 20)
    check_state_path(str(tmp_path / "new" / "s"))  # a state file may be replaced by a newer one
    check_state_path(str(tmp_path / "newer" / "s"))  # the missing directory is created when it is written


@pytest.mark.parametrize("options, says", [
    (dict(asks=3), "more than 1 only with --state"), (dict(asks=0), "asks=0"),
    (dict(state="new", perplexity=True), "not go with --perplexity"), (dict(state="ckpt"), "not a state file"),
])
def test_eval_passkey_state_options_are_checked_before_reading(tmp_path, options, says):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    paths = dict(new=str(tmp_path / "s"), ckpt=ckpt)
    cfg = {**settings_of(vars(eval_passkey)), "ckpt": ckpt, **{k: paths.get(v, v) for k, v in options.items()}}
    with pytest.raises(ValueError, match=says) as e:
        eval_passkey.prepare(cfg)
    assert "\n" not in str(e.value)


def _checkpoint(path: Path, seed: int = 0) -> str:
    model = tiny_model(seed, vocab_size=ENC.n_vocab, chunk_size=16)
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.config), config={"tokenizer": "bytes"}),
                    str(path))
    return str(path)


def sample(*args) -> str:
    r = subprocess.run([sys.executable, "sample.py", "--threads=1", "--max_new_tokens=6", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_sample_saves_a_state_then_answers_questions_from_it_without_changing_it(tmp_path):
    ckpt, state = _checkpoint(tmp_path / "ckpt.pt"), str(tmp_path / "book.state")
    book = "".join(random.Random(0).choice("abc de.\n") for _ in range(3000))
    (tmp_path / "book.txt").write_text(book)
    questions = ("Who is it", "Where", "pass key 1")  # an untrained model answers these three differently
    (tmp_path / "q.txt").write_text("\n".join(questions) + "\n")
    assert "wrote" in sample(f"--ckpt={ckpt}", f"--prompt_file={tmp_path / 'book.txt'}", f"--save_state={state}")
    before = Path(state).read_bytes()
    batch = sample(f"--ckpt={ckpt}", f"--load_state={state}", f"--questions={tmp_path / 'q.txt'}")
    one = continuation(sample(f"--ckpt={ckpt}", f"--load_state={state}", f"--prompt={questions[1]}"))
    model, _ = load_model(ckpt)  # in this process: the book read, then each question asked from that state
    _, read = stream(model, torch.tensor([ENC.encode_ordinary(book)]), new_stream(model))
    loaded, header = load_state(state, model, ENC)
    assert header["tokens_read"] == len(book) and same_state(loaded, read)
    cfg = dict(piece=65536, max_new_tokens=6, temperature=0.0, top_k=0, chunk_align="right")  # sample.py's plan
    want = [ENC.decode(answer(model, [torch.tensor([ENC.encode_ordinary(q)])], read, cfg, [0, 0])[0].tolist())
            for q in questions]
    assert len(set(want)) == 3 and one == want[1]
    assert all(f"{q} => {a}\n" in batch for q, a in zip(questions, want)) and "3 prompt(s)" in batch
    assert Path(state).read_bytes() == before
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={other}", f"--load_state={state}", "--prompt=Where"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode and r.stderr.count("\n") == 1 and "other weights" in r.stderr
    save_state(str(tmp_path / "two.state"), model, repeat_state(read, 2), ENC, len(book))  # eval_passkey writes these
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt}", f"--load_state={tmp_path / 'two.state'}",
                        "--prompt=Where"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode and r.stderr.count("\n") == 1 and "states of 2 contexts" in r.stderr


def same_state(a, b) -> bool:
    flat = lambda s: [t for m in s.memory for t in m.tensors()] + [s.tokens] + [t for kv in s.cache for t in kv]
    return all(torch.equal(x, y) for x, y in zip(flat(a), flat(b))) and len(flat(a)) == len(flat(b))


def continuation(out: str) -> str:
    """The generated text sample.py prints after "=> " (it may hold new lines)."""
    return out.split("=> ", 1)[1].rsplit("\n", 2)[0]


@pytest.mark.parametrize("align", ["left", "right"])
def test_sample_answers_a_prompt_from_an_empty_stream_with_the_chunk_plan_it_is_given(model, align):
    """sample.py right-aligns the prompt and its max_new_tokens, as eval_passkey does: the greedy answer follows
    the forward with that plan (12 + 7 - 1 = 18 tokens read: chunks of 2, 8, 8 when right-aligned)."""
    prompts = [tokens(12), tokens(12, seed=1)]
    cfg = dict(piece=5, max_new_tokens=7, temperature=0.0, top_k=0, chunk_align=align)
    news = answer(model, prompts, new_stream(model), cfg, [0.0, 0.0])  # one batch of two
    for prompt, new in zip(prompts, news):
        full, _ = model(torch.cat([prompt, new[None]], 1)[:, :-1], align=align)
        assert torch.equal(full[0, 11:].argmax(-1), new)
