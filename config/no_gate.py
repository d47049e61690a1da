# Ablation: the global memory without its gate (S3): each chunk's readouts overwrite it (s_t = RMSNorm(r_t)), as a
# recurrent memory transformer (RMT) does.
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/no_gate.py --out_dir=out/no_gate
global_gate = False
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
