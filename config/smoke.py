# A run of seconds that exercises every part of train.py (the tests use it); the model learns nothing useful.
# python train.py config/smoke.py --out_dir=out/smoke
n_layer = 1
n_embd = 32
n_head = 2
n_kv_head = 2
ffn_hidden = 64
chunk_size = 16
n_global = 2
stride = 4
temp_budget = 8
min_len = 110      # the shortest passkey sequence: sentence + question + answer + a little filler
max_len = 150
batch_size = 2
eval_trials = 5
threads = 1
lr = 3e-3
max_iters = 20
