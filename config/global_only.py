# Ablation: CoMeT with the global memory only (S3), no temporary memory (S4): no compression tokens, no FIFO.
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/global_only.py --out_dir=out/global_only
temp_budget = 0
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
