# CoMeT at train.py's shape (4 layers, d 128, chunks of 64 tokens, 16 global slots, a FIFO of 32) on the
# ablations' recipe: the reference row of docs/ablations.md, which the variants change one thing each from.
# The ablations' recipe (docs/ablations.md): 128-512 tokens, 1,800 steps, keys at depth 0 or 1 in one sequence of
# ten, chunks cut from the first token, each batch whole on all threads.
# python train.py config/comet.py --out_dir=out/comet
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
max_iters = 1800
