# Ablation: CoMeT with the temporary memory only (S4), no global memory (S3): no readout tokens, and what
# leaves the 32-slot FIFO (4 chunks of 8 compression tokens) is gone.
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/temp_only.py --out_dir=out/temp_only
n_global = 0
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
