# Baseline: the same decoder without memories, plain causal attention over the whole sequence. It cannot read
# past block_size, and positions beyond its training length were never seen (eval_passkey.py --block_size=N).
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/full_attention.py --out_dir=out/full_attention
chunk_size = 0
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
