# The SmolLM2 recipe (config/finetune_smollm2.py) scaled for one GPU; apply it after the CPU recipe:
# python train.py config/finetune_smollm2.py config/finetune_smollm2_gpu.py --out_dir=out/smollm2_gpu
# Not yet run on a GPU. Chunks of 512 as in the paper's smaller settings,
# sequences of 2-8 chunks (the key still has to cross borders). The held-out essays are ~31k tokens: beyond
# that the filler wraps around (fine for the passkey; perplexity stays within it).
dtype = "bfloat16"        # autocast; the frozen base and the memories stay fp32 master weights
threads = 0
chunk_size = 512
n_global = 64
stride = 8                # 64 compression tokens a chunk
temp_budget = 128         # the FIFO holds 2 chunks
min_len = 1024
max_len = 4096
batch_size = 16
max_iters = 2000
eval_interval = 100
eval_trials = 100
ckpt_interval = 100
