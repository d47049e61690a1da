"""scripts/plan.py: the memory plan's terms against exact counts, sharding arithmetic, and its command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scripts import plan
from model import ModelConfig, Transformer

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=80, chunk_size=16,
                  n_global=4, stride=4, temp_budget=8, adapter_rank=2)


def test_layer_elements_equal_what_autograd_saves_over_a_sequence():
    """Every tensor autograd keeps for backward (parameters aside), counted once per storage, against the
    formula summed over chunks with the memory prefix each chunk really has (the FIFO fills up)."""
    torch.manual_seed(0)
    model, B, n_chunks = Transformer(CFG).train(), 3, 8
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in model.chunks(torch.randint(64, (B, n_chunks * CFG.chunk_size))):
            pass
    rows = CFG.chunk_size + CFG.n_compression + CFG.n_global
    want = CFG.n_layer * B * sum(plan.layer_elements(CFG, sum(CFG.memory_slots(c)), rows) for c in range(n_chunks))
    assert sum(seen.values()) == pytest.approx(want, rel=0.03)


def test_parameters_gradients_and_optimizer_are_exact_counts():
    model = Transformer(CFG)
    base, mem = model.param_counts()
    full = plan.make_plan(CFG, 256, 1, pp=1, dp=1, act_bytes=4, freeze_base=False, checkpoint_activations=False)
    assert (full.parameters, full.gradients, full.optimizer) == (4 * (base + mem), 4 * (base + mem), 8 * (base + mem))
    frozen = plan.make_plan(CFG, 256, 1, pp=1, dp=1, act_bytes=4, freeze_base=True, checkpoint_activations=False)
    assert (frozen.parameters, frozen.gradients, frozen.optimizer) == (2 * base + 4 * mem, 4 * mem, 8 * mem)


def test_dp_shards_the_states_and_pp_splits_the_chunks():
    one = plan.make_plan(CFG, 1024, 2, pp=1, dp=1, act_bytes=2, freeze_base=False, checkpoint_activations=False)
    dp4 = plan.make_plan(CFG, 1024, 2, pp=1, dp=4, act_bytes=2, freeze_base=False, checkpoint_activations=False)
    pp4 = plan.make_plan(CFG, 1024, 2, pp=4, dp=1, act_bytes=2, freeze_base=False, checkpoint_activations=False)
    assert dp4.optimizer == one.optimizer // 4 and dp4.activations == one.activations and dp4.transient > 0
    assert (one.chunks_per_rank, pp4.chunks_per_rank) == (64, 16) and pp4.optimizer == one.optimizer
    assert pp4.logits == one.logits // 4 and pp4.activations < one.activations / 3.5


def test_a_chunked_loss_holds_the_logits_of_one_piece_of_each_sequence():
    kw = dict(pp=1, dp=1, act_bytes=2, freeze_base=False, checkpoint_activations=True)
    whole = plan.make_plan(CFG, 1024, 2, **kw)
    pieces = plan.make_plan(CFG, 1024, 2, loss_chunk=256, **kw)
    assert pieces.logits * 4 == whole.logits and pieces.activations == whole.activations
    assert plan.make_plan(CFG, 1024, 2, loss_chunk=4096, **kw).logits == whole.logits  # one piece: all of it


def test_checkpointing_keeps_each_steps_inputs_and_one_step():
    kw = dict(pp=1, dp=1, act_bytes=4, freeze_base=False)
    off = plan.make_plan(CFG, 1024, 2, checkpoint_activations=False, **kw)
    on = plan.make_plan(CFG, 1024, 2, checkpoint_activations=True, **kw)
    rows, state = CFG.chunk_size + CFG.n_compression + CFG.n_global, 2 * CFG.n_global + CFG.temp_budget
    layer = plan.layer_elements(CFG, CFG.n_global + CFG.temp_budget, rows) * 2 * 4
    last = 3 * 2 * 1024 * CFG.n_embd * 4  # the output's token states, in both
    assert on.activations == CFG.n_layer * 64 * 2 * (rows + state) * CFG.n_embd * 4 + layer + last
    assert off.activations == CFG.n_layer * 64 * layer + last


@pytest.mark.parametrize("n_embd, tokens, checkpointed", [(64, 512, False), (64, 1024, True), (256, 128, True)],
                         ids=["activations", "checkpointed", "gradients_as_large_as_activations"])
def test_the_plan_equals_the_live_tensors_of_a_measured_step(n_embd, tokens, checkpointed):
    """A real fp32 training step's live tensors (profiled) at their peak, above the weights and AdamW states,
    against the plan's peak minus those: its terms, and gradients filled while activations are still held."""
    cfg = ModelConfig(vocab_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=n_embd, ffn_hidden=n_embd * 5 // 2,
                      chunk_size=32, n_global=4, stride=4, temp_budget=16, adapter_rank=2)
    want = plan.make_plan(cfg, tokens, 2, pp=1, dp=1, act_bytes=4, freeze_base=False,
                          checkpoint_activations=checkpointed)
    _, _, live = plan.measure_step(cfg, tokens, 2, freeze_base=False, checkpoint_activations=checkpointed)
    assert live == pytest.approx(want.peak - want.parameters - want.optimizer, rel=0.1)


def test_under_bf16_autocast_the_logits_term_matches_a_step_they_dominate():
    """bf16 logits, then their fp32 log-softmax and two fp32 gradients in backward: 14 bytes a logit, not 18 (the
    fp32 copy that autocast makes for the loss is freed once the log-softmax is taken). Activations checkpointed,
    so that the logits are most of the step."""
    cfg = ModelConfig(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=160, chunk_size=32,
                      n_global=4, stride=4, temp_budget=16, adapter_rank=2)
    want = plan.make_plan(cfg, 256, 2, pp=1, dp=1, act_bytes=2, freeze_base=False, checkpoint_activations=True)
    step = plan.step_runner(cfg, 256, 2, freeze_base=False, checkpoint_activations=True, bf16=True)
    step(), step()  # AdamW's states exist from the second step on, as in `measure_step`
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    assert want.logits > 0.75 * (want.peak - want.parameters - want.optimizer)
    assert plan.live_peak(prof.events()) == pytest.approx(want.peak - want.parameters - want.optimizer, rel=0.1)


def run(*args):
    return subprocess.run([sys.executable, "-m", "scripts.plan", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_plan_that_does_not_fit_says_by_how_much_and_what_to_try():
    r = run("--model=Llama-3.1-8B", "--context=32768", "--gpu_gib=80")
    assert r.returncode == 1 and "8.03B base" in r.stdout
    assert ("does not fit: needs 438.8 GiB per GPU, you have 80: try --checkpoint_activations or --pp=2 or "
            "--freeze_base") in r.stdout


def test_a_plan_reads_a_hugging_face_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=True)))
    r = run(f"--model={tmp_path}", "--context=512", "--chunk_size=64", "--gpu_gib=1")
    assert r.returncode == 0 and "fits:" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("args, message", [
    (["--pp=9", "--context=16384"], "8 chunks cannot split over pp=9 ranks: lower pp or chunk_size"),
    (["--dp=0"], "dp=0 must be > 0"),
    (["--loss_chunk=256", "--pp=2"], "loss_chunk works in one process (as in train.py): drop it or --pp/--dp"),
    (["--loss_chunk=256", "--measure"], "--measure runs steps with the whole logits: drop --loss_chunk"),
    (["--model=/no/such/dir"], "model='/no/such/dir' is neither a shape I know (Llama-3.2-1B, Llama-3.1-8B"),
])
def test_bad_plan_settings_are_one_clear_line(args, message):
    r = run(*args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
