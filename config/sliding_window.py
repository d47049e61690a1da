# Baseline: a plain decoder whose tokens attend to the last 48 positions only, as many as CoMeT's memories hold per
# layer (16 global + 32 temporary slots). 4 layers reach back at most 4 x 47 tokens. Its streaming KV cache is not
# trimmed to the window (memory grows with the context); eval_passkey.py needs --block_size=N to read N tokens.
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/sliding_window.py --out_dir=out/sliding_window
chunk_size = 0
window = 48
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
