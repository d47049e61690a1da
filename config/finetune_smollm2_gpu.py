# The SmolLM2 recipe (config/finetune_smollm2.py) scaled for one GPU; apply it after the CPU recipe:
# python train.py config/finetune_smollm2.py config/finetune_smollm2_gpu.py --out_dir=out/smollm2_gpu
# The same memories (chunks of 128, 16 global slots, a FIFO of 2 chunks), so its results read beside the CPU run's;
# longer sequences (6 to 16 chunks), 8x the batch and 4x the steps. Memory for one step, planned as a full fine-tune
# (an upper bound: here only attention and the memories train):
# python -m scripts.plan --model=<the GGUF> --context=2048 --batch=32 --chunk_size=128 --n_global=16 \
#     --temp_budget=32 --checkpoint_activations --dtype=bfloat16 --loss_chunk=256      # 11.6 GiB
dtype = "bfloat16"              # autocast; the frozen weights are held in bf16, what trains in fp32
threads = 0
checkpoint_activations = True   # keep each layer-over-chunk step's inputs only
loss_chunk = 256                # the logits of 256 tokens of each sequence at a time: 5 GiB instead of 42
min_len = 768
max_len = 2048
batch_size = 32
max_iters = 1000
eval_interval = 100
eval_trials = 100
ckpt_interval = 100
