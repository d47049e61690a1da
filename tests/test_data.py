"""The passkey generator (S8) and the offline tokenizers."""
import base64
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

import data
from data import PASSKEY, QUESTION, get_tokenizer, make_passkey, sample_batch, stack
from ram.tasks import make_sample

ENC = get_tokenizer("bytes")


def decode(ids):
    return ENC.decode(ids.tolist())


@pytest.mark.parametrize("length", [200, 513, 4096])
def test_passkey_sequence_has_exactly_the_requested_length(length):
    s = make_passkey(ENC, length, 0.3, random.Random(0))
    assert s.tokens().shape == (length,)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_passkey_sentence_sits_at_the_requested_depth_of_the_filler(depth):
    s = make_passkey(ENC, 2000, depth, random.Random(1))
    text = decode(s.tokens())
    start = text.index("The pass key is ")
    n_filler = s.n_context - len(s.sentence)
    assert start == s.insert == round(depth * n_filler)
    assert text.endswith(QUESTION + decode(s.answer))


def test_answer_is_the_key_of_the_passkey_sentence():
    s = make_passkey(ENC, 300, 0.5, random.Random(2), digits=5)
    key = decode(s.answer)
    assert key[0] == " " and key[1:].isdigit() and len(key) == 6
    assert PASSKEY.format(key=key[1:]) in decode(s.tokens())
    assert decode(s.tokens()[-len(s.answer):]) == key


def test_filler_around_the_sentence_is_the_periodic_filler_text():
    s = make_passkey(ENC, 1500, 0.5, random.Random(3))
    text = decode(s.tokens())
    without_sentence = text[:s.insert] + text[s.insert + len(s.sentence):s.n_context]
    period = data.FILLER
    assert without_sentence == (period * 30)[s.phase:s.phase + len(without_sentence)]


def test_lazy_slices_equal_the_whole_sequence():
    s = make_passkey(ENC, 1000, 0.4, random.Random(4))
    whole = s.tokens()
    for a, b in [(0, 1), (0, 1000), (390, 470), (950, 1000), (123, 124)]:
        assert np.array_equal(s.tokens(a, b), whole[a:b])


def test_same_seed_gives_the_same_batch_and_another_seed_does_not():
    a, mask_a = stack(sample_batch(ENC, 4, 300, seed=7))
    b, mask_b = stack(sample_batch(ENC, 4, 300, seed=7))
    c, _ = stack(sample_batch(ENC, 4, 300, seed=8))
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and not np.array_equal(a, c)


def test_random_depths_include_both_ends_and_the_middle():
    tokens, _ = stack(sample_batch(ENC, 400, 300, seed=0))
    starts = np.array([ENC.decode(row.tolist()).index("The pass key is") for row in tokens])
    n_filler = 300 - 59 - len(QUESTION) - 6  # sentence, question and answer take the rest
    assert 10 <= (starts == 0).sum() <= 40 and 10 <= (starts == n_filler).sum() <= 40
    assert ((starts > 0) & (starts < n_filler)).sum() >= 300


@pytest.mark.parametrize("edges", [0.0, 0.5, 1.0])
def test_the_edge_share_of_random_depths_sits_exactly_at_0_or_1(edges):
    """train.py's edge_depths: that share of the keys lies right at the start or right before the question
    (a uniform depth rounds onto an edge too, about once in n_filler / 2)."""
    rows = data.sample_batch(ENC, 400, 300, seed=0, edges=edges)
    at_edge = sum(s.inserts[0] in (0, s.n_context - len(s.sentence)) for s in rows)
    assert abs(at_edge - 400 * edges) <= (8 if edges in (0, 1) else 40)  # 0.5: binomial, 3 sigma is 30


def test_batch_answer_mask_marks_the_last_answer_tokens():
    tokens, answer = stack(sample_batch(ENC, 3, 250, seed=0))
    assert tokens.shape == answer.shape == (3, 250)
    assert answer.sum(1).tolist() == [6, 6, 6] and answer[:, -6:].all()


def test_too_short_a_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="too short for this task: it needs at least"):
        make_passkey(ENC, 50, 0.5, random.Random(0))


def test_depth_outside_0_1_is_an_error():
    with pytest.raises(ValueError, match="depth=1.5"):
        make_passkey(ENC, 500, 1.5, random.Random(0))


# --- tokenizers -------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_any_text_and_reserves_special_ids():
    text = "héllo, wörld 🙂\n\t 12345"
    assert ENC.decode(ENC.encode_ordinary(text)) == text
    assert max(ENC.encode_ordinary(text)) < 256
    assert [ENC.encode_single_token(s) for s in data.SPECIALS] == [256, 257, 258]
    assert ENC.n_vocab == 259


def test_gpt2_tokenizer_without_a_cached_file_fails_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_tokenizer("gpt2")


def test_gpt2_tokenizer_rejects_a_corrupt_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    (tmp_path / hashlib.sha1(data.GPT2_URL.encode()).hexdigest()).write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match="corrupt"):
        get_tokenizer("gpt2")


def test_bpe_tokenizer_from_a_local_rank_file(tmp_path):
    ranks = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello"]
    path = tmp_path / "tiny.tiktoken"
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for r, t in enumerate(ranks)))
    enc = get_tokenizer(str(path))
    assert enc.encode_ordinary("hello hello") == [259, 32, 259]
    assert enc.decode(enc.encode_ordinary("hello, wörld")) == "hello, wörld"
    assert enc.encode_single_token("<|endoftext|>") == 260 and enc.encode_single_token("<|readout|>") == 263


# --- real English filler: a text file, split into training and held-out tokens ---------------------------

def english_file(tmp_path, chars=40_000):
    """Real prose the repository holds (README and docs), enough of it for both splits: a test asset made here."""
    root = Path(__file__).resolve().parents[1]
    text = "".join(p.read_text() for p in sorted((root / "docs").glob("*.md")))
    path = tmp_path / "english.txt"
    path.write_text((root / "README.md").read_text() + text[:chars])
    return str(path)


def test_training_and_held_out_filler_split_the_text_at_one_token_without_overlap(tmp_path):
    path = english_file(tmp_path)
    train, held = data.filler_tokens(ENC, path, "train"), data.filler_tokens(ENC, path, "heldout")
    whole = np.array(ENC.encode_ordinary(open(path).read()))
    assert np.array_equal(np.concatenate([train, held]), whole)
    assert len(held) == len(whole) - round(len(whole) * (1 - data.HELD_OUT))


@pytest.mark.parametrize("depth", [0.0, 0.13, 0.5, 0.97, 1.0])
def test_real_filler_passkey_has_the_length_depth_key_and_answer_span_asked_for(tmp_path, depth):
    held = data.filler_tokens(ENC, english_file(tmp_path), "heldout")
    s = make_passkey(ENC, 3000, depth, random.Random(3), filler=held)
    tokens = s.tokens()
    assert tokens.shape == (3000,)
    n_filler = s.n_context - len(s.sentence)
    assert s.insert == round(depth * n_filler)
    assert np.array_equal(tokens[s.insert:s.insert + len(s.sentence)], s.sentence)
    key = decode(s.answer)[1:]
    assert decode(s.sentence) == "\n" + PASSKEY.format(key=key) and len(key) == 5
    assert np.array_equal(tokens[-len(s.answer):], s.answer) and decode(s.question) == "\n" + QUESTION
    # around the sentence, the filler is the held-out text itself, read on from a random offset
    filler = np.concatenate([tokens[:s.insert], tokens[s.insert + len(s.sentence):s.n_context]])
    assert np.array_equal(filler, held[(s.phase + np.arange(n_filler)) % len(held)])


def test_a_missing_filler_file_says_how_to_make_the_essays(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"python data.py essays"):
        data.filler_tokens(ENC, data.ESSAYS, "train")
    with pytest.raises(FileNotFoundError, match=r"must be grass or a text file"):
        data.filler_tokens(ENC, str(tmp_path / "nope.txt"), "train")


def test_a_filler_text_too_short_to_split_is_a_clear_error(tmp_path):
    (tmp_path / "short.txt").write_text("Too short to hide a passkey in. " * 20)
    with pytest.raises(ValueError, match=r"too short to split"):
        data.filler_tokens(ENC, str(tmp_path / "short.txt"), "train")


def test_the_sequences_of_a_seed_never_change():
    # sha256 of these sequences as the passkey and facts tasks have always generated them (a pinned hash)
    h = hashlib.sha256()
    for seed in range(5):
        for s in data.sample_batch(ENC, 4, 300 + 37 * seed, seed):
            h.update(s.tokens().astype(np.int64).tobytes())
        h.update(make_sample("facts", ENC, 500, 0.3, random.Random(seed)).tokens().astype(np.int64).tobytes())
    assert h.hexdigest() == "d696f3928f9e1a01133d2b93f309432c965470ff99f937f85fd25293274f66ae"


def test_a_text_file_that_is_not_utf8_is_named_with_the_remedy(tmp_path):
    path = tmp_path / "essays.txt"
    path.write_bytes("caf\xe9 \x91quoted\x92 ".encode("latin-1") * 400)
    with pytest.raises(ValueError, match=f"^filler {path} is not UTF-8 text \\(byte 0xe9 at offset 3\\): save it as "
                                         "UTF-8, e.g. iconv"):
        data.filler_tokens(get_tokenizer("bytes"), str(path), "train")


def test_a_file_that_is_not_a_tokenizer_is_one_line_listing_what_is(tmp_path):
    (tmp_path / "notes.md").write_text("# not a tokenizer\n")
    with pytest.raises(ValueError, match="is not a tokenizer: give bytes, gpt2, a .tiktoken file"):
        get_tokenizer(str(tmp_path / "notes.md"))
