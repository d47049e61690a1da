"""llama.py: Llama checkpoints (Hugging Face and Meta layouts) load into model.py with transformers' logits,
its greedy tokens and clear errors; CoMeT memories go on top of a frozen pretrained base."""
import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import data
from checkpoint import load_model
from llama import (attach_memories, base_header, fingerprint, freeze_base, load_llama, meta_to_hf_rotary,
                   memory_state, read_memories, save_memories)
from model import Transformer
from stream import generate

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}  # short, so that all three RoPE bands occur
CASES = {
    "mha_tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_untied_theta500k": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
    "llama3_rope_scaling": dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "sharded": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0),
}


def hf_model(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5, **overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights of a size that makes every part matter (HF's init is near zero)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> (directory, the transformers model that wrote it)."""
    out = {}
    for case, overrides in CASES.items():
        path = tmp_path_factory.mktemp(case)
        model = hf_model(**overrides)
        model.save_pretrained(path, max_shard_size="40KB" if case == "sharded" else "1GB")
        out[case] = path, model
    assert (out["sharded"][0] / "model.safetensors.index.json").exists()
    return out


def ids(n=70, batch=2, seed=1):
    return torch.randint(300, (batch, n), generator=torch.Generator().manual_seed(seed))


def write_meta(hf_dir: Path, out: Path, n_head=4, n_kv_head=2) -> Path:
    """Meta's layout of an HF checkpoint: our names, interleaved q/k rows, params.json."""
    out.mkdir()
    sd = load_file(hf_dir / "model.safetensors")
    cfg = json.loads((hf_dir / "config.json").read_text())
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attention_norm", "self_attn.q_proj": "attention.wq", "self_attn.k_proj":
             "attention.wk", "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
             "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}
    meta = {}
    for key, t in sd.items():
        if key in names:
            meta[names[key]] = t
            continue
        _, _, i, *rest = key.split(".")
        name = f"layers.{i}.{parts['.'.join(rest[:-1])]}.weight"
        if name.endswith(("wq.weight", "wk.weight")):  # HF -> Meta: the inverse of meta_to_hf_rotary
            heads = n_head if "wq" in name else n_kv_head
            rows, d = t.shape
            t = t.view(heads, 2, rows // heads // 2, d).transpose(1, 2).reshape(rows, d)
        meta[name] = t.clone()
    torch.save(meta, out / "consolidated.00.pth")
    rope = cfg.get("rope_parameters") or {}
    (out / "params.json").write_text(json.dumps(dict(
        dim=64, n_layers=2, n_heads=n_head, n_kv_heads=n_kv_head, vocab_size=300, multiple_of=32, norm_eps=1e-5,
        rope_theta=cfg.get("rope_theta") or rope.get("rope_theta"))))  # 2/3 of 4*64 = 170 -> 192 (multiple of 32)
    return out


# --- parity with transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(checkpoints, case):
    path, hf = checkpoints[case]
    model = load_llama(str(path))
    x = ids()
    with torch.no_grad():
        diff = (model(x)[0] - hf(x).logits).abs().max().item()
    assert diff <= 1e-4


def test_meta_layout_converted_from_the_gqa_checkpoint_gives_transformers_logits(checkpoints, tmp_path):
    path, hf = checkpoints["gqa_untied_theta500k"]
    model = load_llama(str(write_meta(path, tmp_path / "meta")))
    assert not model.config.tie_embeddings and model.config.ffn_hidden == 192
    x = ids()
    with torch.no_grad():
        assert (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["gqa_untied_theta500k", "llama3_rope_scaling"])
def test_greedy_generation_of_20_tokens_equals_transformers(checkpoints, case):
    path, hf = checkpoints[case]
    prompt = ids(12, batch=1, seed=6)
    ours, _ = generate(load_llama(str(path)), prompt, 20, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)[:, 12:]
    assert torch.equal(ours, theirs)
    assert len(set(theirs[0].tolist())) >= 8  # a varied continuation, not one token repeated


def test_a_llama2_style_meta_checkpoint_with_rope_freqs_and_vocab_minus_one_loads(checkpoints, tmp_path):
    path, hf = checkpoints["gqa_untied_theta500k"]
    meta = write_meta(path, tmp_path / "meta")
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "rope.freqs": torch.ones(8)}, meta / "consolidated.00.pth")  # Llama 1/2 carry it
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))  # Llama 2 writes -1
    model = load_llama(str(meta))
    x = ids()
    with torch.no_grad():
        assert model.config.vocab_size == 300 and (model(x)[0] - hf(x).logits).abs().max().item() <= 1e-4


def test_rotary_permutation_moves_each_adjacent_pair_to_the_two_halves_of_its_head():
    w = torch.arange(2 * 8).view(2 * 8, 1).float()  # 2 heads of 8 rows: Meta pairs (0,1), (2,3), ...
    assert meta_to_hf_rotary(w, 2).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]


def test_loading_in_bfloat16_puts_every_weight_in_bfloat16(checkpoints):
    model = load_llama(str(checkpoints["gqa_untied_theta500k"][0]), dtype=torch.bfloat16, chunk_size=16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


# --- bad input: one clear error naming the file and the tensor ----------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_directory_without_a_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json .* or params.json"):
        load_llama(str(tmp_path))


def test_a_missing_shard_is_named(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["sharded"][0], tmp_path / "ckpt")
    next(path.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-\d+\.safetensors: missing"):
        load_llama(str(path))


def test_a_missing_tensor_is_named(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["mha_tied"][0], tmp_path / "ckpt")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight is "):
        load_llama(str(path))


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["mha_tied"][0], tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has "
                                         r"shape \(192, 64\), but the config says \(128, 64\)"):
        load_llama(str(path))


def test_a_config_without_a_required_key_is_named(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["mha_tied"][0], tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["intermediate_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'intermediate_size'"):
        load_llama(str(path))


@pytest.mark.parametrize("damage, says", [(lambda c: [c], "expected a JSON object of settings, found a list"),
                                          (lambda c: {**c, "num_attention_heads": 0}, "not a Llama config"),
                                          (lambda c: {**c, "num_hidden_layers": "two"}, "n_layer must be int")])
def test_a_config_of_the_wrong_shape_or_type_is_one_line_naming_the_file(checkpoints, tmp_path, damage, says):
    path = copy_checkpoint(checkpoints["mha_tied"][0], tmp_path / "ckpt")
    (path / "config.json").write_text(json.dumps(damage(json.loads((path / "config.json").read_text()))))
    with pytest.raises(ValueError, match=f"config\\.json: .*{says}") as e:
        load_llama(str(path))
    assert "\n" not in str(e.value)


def test_an_unknown_architecture_is_named(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["mha_tied"][0], tmp_path / "ckpt")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ValueError, match=r"config\.json: architecture 'MistralForCausalLM' is not supported"):
        load_llama(str(path))


class NotATensor:
    pass


def test_a_pth_holding_an_arbitrary_pickle_is_refused(checkpoints, tmp_path):
    meta = write_meta(checkpoints["gqa_untied_theta500k"][0], tmp_path / "meta")
    torch.save({"tok_embeddings.weight": NotATensor()}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"refused to load .*consolidated\.00\.pth: it holds objects other than"):
        load_llama(str(meta))


def test_a_pth_holding_plain_data_instead_of_a_tensor_names_it(checkpoints, tmp_path):
    meta = write_meta(checkpoints["gqa_untied_theta500k"][0], tmp_path / "meta")
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "norm.weight": "a string"}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: norm\.weight is not a tensor"):
        load_llama(str(meta))


# --- CoMeT on a pretrained model -----------------------------------------------------------------------

def test_loaded_model_without_memories_equals_the_plain_pretrained_decoder(checkpoints):
    path = str(checkpoints["gqa_untied_theta500k"][0])
    plain = load_llama(path)
    no_memories = load_llama(path, chunk_size=64, n_global=0, temp_budget=0)
    x = ids(64)  # one chunk
    with torch.no_grad():
        torch.testing.assert_close(no_memories(x)[0], plain(x)[0], rtol=0, atol=1e-5)


def test_with_a_frozen_base_only_memories_and_new_embeddings_get_gradients(checkpoints):
    model = load_llama(str(checkpoints["gqa_untied_theta500k"][0]), chunk_size=16, n_global=4, stride=4,
                       temp_budget=8).train()
    trainable = set(freeze_base(model))
    x = ids(40)
    model(x, targets=x)[1].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    # every one of them learns (the adapters' down-projections only once W_up has left zero, S5)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable and "down" not in n)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("memories.")} | {
        "compression_emb", "readout_emb"}


def test_unfreezing_attention_trains_q_k_v_o_and_the_attention_norms_as_well_as_the_memories(checkpoints):
    model = load_llama(str(checkpoints["gqa_untied_theta500k"][0]), chunk_size=16, n_global=4, stride=4,
                       temp_budget=8).train()
    trainable = set(freeze_base(model, unfreeze="attention"))
    x = ids(40)
    model(x, targets=x)[1].backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    attention = {n for n, _ in model.named_parameters() if n.startswith("layers.") and (
        ".attention." in n or ".attention_norm." in n)}
    assert trainable == attention | {n for n, _ in model.named_parameters() if model.is_memory_param(n)}
    assert len(attention) == 5 * model.config.n_layer and not any("feed_forward" in n for n in trainable)


def test_memories_with_their_unfrozen_attention_and_sink_row_saved_and_attached_give_the_same_logits(checkpoints,
                                                                                                   tmp_path):
    path = str(checkpoints["gqa_untied_theta500k"][0])
    model = load_llama(path, chunk_size=16, n_global=4, stride=4, temp_budget=8, sink_token=1)
    freeze_base(model, unfreeze="attention")
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.1)  # trained memories and attention
    save_memories(memory_state(model, "attention"), str(tmp_path / "m.safetensors"), base_header(path, model),
                  {"unfreeze": "attention"})
    again = attach_memories(path, *read_memories(str(tmp_path / "m.safetensors")), "m.safetensors")
    x = ids(40)
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])


@pytest.mark.parametrize("init", ["mean", "apart"])
def test_readout_embeddings_start_as_one_vector_with_noise_or_as_distinct_directions(checkpoints, init):
    model = load_llama(str(checkpoints["gqa_untied_theta500k"][0]), chunk_size=16, n_global=8, stride=4,
                       temp_budget=8, readout_init=init)
    emb = model.tok_embeddings.weight.detach()
    spread = (emb - emb.mean(0)).norm(dim=1).mean()  # a token's typical distance from the mean token
    away = model.readout_emb.detach() - emb.mean(0)  # (n_global, C)
    if init == "apart":  # orthogonal, each as far from the mean as a token
        torch.testing.assert_close(away @ away.T, spread ** 2 * torch.eye(8), atol=1e-4 * spread ** 2, rtol=0)
    else:  # near-copies of the mean
        assert away.norm(dim=1).max() < 0.2 * spread


def test_new_compression_and_readout_embeddings_start_at_the_mean_token_embedding(checkpoints):
    model = load_llama(str(checkpoints["mha_tied"][0]), chunk_size=16, n_global=4, stride=4, temp_budget=8)
    mean = model.tok_embeddings.weight.mean(0)
    torch.testing.assert_close(model.compression_emb[0], mean)
    spread = (model.readout_emb - mean).norm(dim=-1)
    assert (spread > 0).all() and (spread < 0.2 * model.tok_embeddings.weight.norm(dim=-1).mean()).all()


# --- tokenizers ----------------------------------------------------------------------------------------

def write_llama3_tokenizer(path: Path) -> Path:
    """A tokenizer.model in Llama 3's format: byte ranks plus a few merges."""
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the", b"12", b"123", b"1234"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    return path


def test_llama3_tokenizer_has_llama3_specials_after_the_ranks_and_splits_digits_by_three(tmp_path):
    (tmp_path / "original").mkdir()
    write_llama3_tokenizer(tmp_path / "original" / "tokenizer.model")
    enc = data.get_tokenizer(str(tmp_path))  # found in original/
    assert enc.encode_single_token("<|begin_of_text|>") == 262 and enc.encode_single_token("<|eot_id|>") == 271
    assert enc.n_vocab == 262 + 256 and data.bos_id(enc) == 262
    # Llama 3 splits digits in runs of at most 3 before merging, so the "1234" merge never applies
    assert [enc.decode([t]) for t in enc.encode_ordinary("1234567")] == ["123", "4", "5", "6", "7"]
    text = "the theme: Über 12 \n\n  café"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_llama2_sentencepiece_tokenizer_is_read_through_sentencepiece(tmp_path):
    import sentencepiece
    text = ["The grass is green. The sky is blue.", "The pass key is 12345. Remember it."] * 50
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=28, minloglevel=2)
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    enc = data.get_tokenizer(str(tmp_path))
    assert enc.n_vocab == 28 and enc.decode(enc.encode_ordinary("The sky is green.")) == "The sky is green."
    parts = ["The pass key is", " 12345", ". Remember it."]  # how make_passkey encodes: piece by piece
    assert sum((enc.encode_ordinary(p) for p in parts), []) == enc.encode_ordinary("".join(parts))
    assert data.bos_id(enc) == 1


def test_a_directory_without_a_tokenizer_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.model .* pass --tokenizer=bytes"):
        data.get_tokenizer(str(tmp_path))


# --- train.py and sample.py on a loaded checkpoint ------------------------------------------------------

def train_frozen(path, out_dir, *extra):
    cmd = [sys.executable, "train.py", "config/smoke.py", f"--init_from={path}", "--tokenizer=bytes",
           "--freeze_base=True", "--max_iters=3", "--eval_interval=0", f"--out_dir={out_dir}", *extra]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def frozen(checkpoints, tmp_path_factory) -> Path:
    """A frozen-base run of 3 steps on the GQA checkpoint: its out_dir (ckpt.pt, memories.safetensors)."""
    out = tmp_path_factory.mktemp("frozen")
    train_frozen(checkpoints["gqa_untied_theta500k"][0], out)
    return out


def test_a_frozen_base_checkpoint_holds_only_the_memories_and_names_its_base(checkpoints, frozen):
    path, tmp_path = checkpoints["gqa_untied_theta500k"][0], frozen
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["n_embd"] == 64 and ckpt["model_args"]["chunk_size"] == 16  # loaded + smoke's memories
    assert set(ckpt["model"]) == {n for n in ckpt["model"] if n.startswith(("memories.", "compression_emb",
                                                                             "readout_emb"))}
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"])  # the optimizer holds the memories only
    assert ckpt["base"]["base_path"] == str(path) and ckpt["base"]["base_fingerprint"] == fingerprint(str(path))
    tensors, header = read_memories(str(tmp_path / "memories.safetensors"))  # the file to ship: the same tensors
    assert tensors.keys() == ckpt["model"].keys() and all(torch.equal(tensors[k], ckpt["model"][k]) for k in tensors)
    assert header["settings"]["max_iters"] == 3 and header["memory_args"]["chunk_size"] == 16


def test_a_frozen_base_run_resumed_from_its_memories_gives_the_same_losses(checkpoints, tmp_path):
    path = checkpoints["gqa_untied_theta500k"][0]
    flat = ["--min_lr=1", "--curriculum=0"]  # lr and lengths independent of max_iters: 4 + 2 steps = 6 steps
    train_frozen(path, tmp_path / "b", "--max_iters=4", *flat)
    (tmp_path / "b" / "log.jsonl").write_text("")  # only what the resumed run logs from iteration 4 on
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["iter_num"] == 4
    r = subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'b'}",
                        "--max_iters=6"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    train_frozen(path, tmp_path / "c", "--max_iters=6", *flat)
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("b", "c")]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1] if r["iter"] >= 4]


@pytest.mark.parametrize("case", ["gqa_untied_theta500k"])  # tied embeddings: test_pipeline's frozen base over dp
def test_a_frozen_base_sharded_over_dp_checkpoints_and_resumes_the_memories_of_one_process(checkpoints, tmp_path,
                                                                                          case):
    """--dp=2 (FSDP2) on a frozen pretrained base: only the memories are gathered into the checkpoint and
    memories.safetensors, equal to one process reading both slices; resumed on dp=2, the losses go on as
    one process's. A tied base: its output matrix is the frozen embedding table, never gathered either."""
    path = checkpoints[case][0]
    flat = ["--min_lr=1", "--curriculum=0"]  # lr and lengths independent of max_iters
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train_frozen(path, tmp_path / "one", "--max_iters=5", "--batch_size=4", *flat)
    cmd = [*torchrun, "train.py", "config/smoke.py", f"--init_from={path}", "--tokenizer=bytes",
           "--freeze_base=True", "--eval_interval=0", f"--out_dir={tmp_path / 'grid'}", "--max_iters=3",
           "--batch_size=2", "--dp=2", *flat]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    one, grid = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("one", "grid"))
    memories = read_memories(str(tmp_path / "grid" / "memories.safetensors"))[0]
    assert grid["model"].keys() == one["model"].keys() == memories.keys()
    assert all(Transformer.is_memory_param(n) for n in memories)
    assert len(grid["optimizer"]["state"]) == len(grid["model"])  # AdamW states of the memories only
    r = subprocess.run([*torchrun, "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'grid'}",
                        "--max_iters=5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    curves = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "grid")]
    assert len(curves[1]) == 5 and curves[1] == pytest.approx(curves[0], rel=1e-5)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    grid = torch.load(tmp_path / "grid" / "ckpt.pt", weights_only=True)["model"]
    assert all((grid[n] - one[n]).abs().max() <= 1e-4 * one[n].abs().max() for n in one)  # after 5 AdamW steps


def test_shards_of_a_frozen_base_are_refused_with_one_line(checkpoints, tmp_path):
    path = checkpoints["gqa_untied_theta500k"][0]
    r = subprocess.run([sys.executable, "train.py", "config/smoke.py", f"--init_from={path}", "--tokenizer=bytes",
                        "--freeze_base=True", "--ckpt_shards=True", f"--out_dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: ckpt_shards=True is for full fine-tunes: a frozen base's checkpoint is its memories alone, a few MB "
        "in one file; drop --ckpt_shards"] and not (tmp_path / "ckpt.pt").exists()


def test_memories_saved_and_attached_to_their_base_give_bitwise_the_same_logits(checkpoints, tmp_path):
    path = str(checkpoints["gqa_untied_theta500k"][0])
    model = load_llama(path, chunk_size=16, n_global=4, stride=4, temp_budget=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_memory_param(name):
                p.add_(torch.randn_like(p) * 0.1)  # trained-looking memories, adapters away from identity
    save_memories(memory_state(model), str(tmp_path / "m.safetensors"), base_header(path, model), {"max_len": 40})
    tensors, header = read_memories(str(tmp_path / "m.safetensors"))
    again = attach_memories(path, tensors, header, "m.safetensors")
    x = ids(40)
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])
    assert (tmp_path / "m.safetensors").stat().st_size < 200_000  # the memories alone, not the base


def test_memories_are_refused_on_another_base_model_in_one_line(checkpoints, tmp_path):
    path, other = (str(checkpoints[c][0]) for c in ("gqa_untied_theta500k", "sharded"))
    model = load_llama(path, chunk_size=16, n_global=4, stride=4, temp_budget=8)
    save_memories(memory_state(model), str(tmp_path / "m.safetensors"), base_header(path, model), {})
    tensors, header = read_memories(str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m.safetensors was trained on .*refusing to load it onto another model"):
        attach_memories(other, tensors, header, "m.safetensors")
    with pytest.raises(FileNotFoundError, match=r"needs its base model .* pass --base_path=PATH"):
        attach_memories(str(tmp_path / "gone"), tensors, header, "m.safetensors")


def test_a_base_model_moved_or_renamed_keeps_its_fingerprint_and_other_weights_do_not(checkpoints, tmp_path):
    path = checkpoints["gqa_untied_theta500k"][0]
    moved = copy_checkpoint(path, tmp_path / "elsewhere")
    (moved / "tokenizer_config.json").write_text("{}")  # files beside the weights do not count
    assert fingerprint(str(moved)) == fingerprint(str(path)) != fingerprint(str(checkpoints["mha_tied"][0]))
    (tmp_path / "renamed.bin").write_bytes((path / "model.safetensors").read_bytes())
    assert fingerprint(str(tmp_path / "renamed.bin")) == fingerprint(str(path / "model.safetensors"))


def test_trained_memories_follow_their_base_to_a_new_path_with_base(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gqa_untied_theta500k"][0], tmp_path / "base")
    train_frozen(path, tmp_path / "run")
    moved = path.rename(tmp_path / "moved")
    for ckpt in ("memories.safetensors", "ckpt.pt"):
        args = [sys.executable, "eval_passkey.py", f"--ckpt={tmp_path / 'run' / ckpt}", "--lengths=150",
                "--depths=0.5", "--trials=1", "--threads=1"]
        r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "pass --base_path=PATH" in r.stderr
        r = subprocess.run(args + [f"--base_path={moved}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "length       150" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={tmp_path / 'run'}",
                        "--max_iters=4", f"--base_path={moved}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["base"]["base_path"] == str(moved)


def test_a_frozen_base_run_cannot_resume_with_the_base_unfrozen(frozen):
    tmp_path = frozen  # the refusal writes nothing
    r = subprocess.run([sys.executable, "train.py", "--init_from=resume", f"--out_dir={tmp_path}", "--max_iters=4",
                        "--freeze_base=False"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "freeze_base cannot change when resuming" in r.stderr, r.stderr[-2000:]
    with pytest.raises(ValueError, match=r"holds only memories trained on a frozen .* open it with sample.py"):
        load_model(str(tmp_path / "ckpt.pt"))


def test_a_truncated_or_foreign_memories_file_is_one_clear_error(checkpoints, tmp_path):
    path = str(checkpoints["gqa_untied_theta500k"][0])
    model = load_llama(path, chunk_size=16, n_global=4, stride=4, temp_budget=8)
    save_memories(memory_state(model), str(tmp_path / "m.safetensors"), base_header(path, model), {})
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cut.safetensors \(corrupt or truncated\?\)"):
        read_memories(str(tmp_path / "cut.safetensors"))
    with pytest.raises(ValueError, match=r"is not a nanocomet memories file"):
        read_memories(str(checkpoints["gqa_untied_theta500k"][0] / "model.safetensors"))


def test_sample_and_eval_read_trained_memories_from_their_safetensors_file(frozen):
    memories = frozen / "memories.safetensors"  # bytes: the tiny base has no tokenizer
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={memories}", "--max_new_tokens=0", "--threads=1",
                        "--prompt=The pass key is 12345."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "1 prompt(s), 22 tokens, read at" in r.stdout, r.stderr[-2000:]  # one byte a token
    r = subprocess.run([sys.executable, "eval_passkey.py", f"--ckpt={memories}", "--lengths=150", "--depths=0.5",
                        "--trials=2", "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "trained to 150 tokens" in r.stdout, r.stderr[-2000:]


def test_sample_generates_from_a_llama_directory_with_and_without_memories(checkpoints, tmp_path):
    path = copy_checkpoint(checkpoints["gqa_untied_theta500k"][0], tmp_path / "ckpt")
    write_llama3_tokenizer(path / "tokenizer.model")
    for extra in ([], ["--chunk_size=16"]):
        r = subprocess.run([sys.executable, "sample.py", f"--init_from={path}", "--prompt=the theme 123",
                            "--max_new_tokens=5", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "=> " in r.stdout and "5 tokens generated" in r.stdout, r.stderr[-2000:]
