# CoMeT memories on a pretrained Llama (S5): base frozen, only the memories and the new compression and
# readout embeddings train. A starting point for a GPU (bf16 autocast); not yet measured.
# python train.py config/finetune_llama.py --init_from=/path/to/Llama-3.2-1B --out_dir=out/llama
freeze_base = True
chunk_size = 512
n_global = 64
stride = 8
temp_budget = 512
adapter_rank = 8
min_len = 2048
max_len = 8192
batch_size = 4
max_iters = 600
eval_interval = 100
eval_trials = 20
lr = 2e-4
memory_lr_mult = 5.0      # memories at 1e-3
warmup = 0.05
