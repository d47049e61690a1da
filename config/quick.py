# Watch the memories learn in about 3 minutes on 2 CPU cores: the default model and recipe on shorter sequences
# (128-384 tokens, up to 6 chunks, more than the 4 chunks the FIFO holds: a key at the start must travel in the
# global memory) and 600 steps, with an evaluation every 100 steps whose accuracy the progress bar shows
# (what it reaches: docs/results.md); the default job goes on to 100%.
# python train.py config/quick.py --out_dir=out/quick
max_len = 384
max_iters = 600
warmup = 0.1              # 60 steps, as the default job warms up
eval_interval = 100
eval_trials = 20
ckpt_interval = 600
