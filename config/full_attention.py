# Baseline: the same tiny decoder and recipe as config/comet.py (the default before issue 20) without
# memories: plain causal attention over the whole sequence (chunk_size=0). It cannot read past block_size,
# and positions beyond its training length were never seen (eval_passkey.py --block_size=N lets it try).
# python train.py config/full_attention.py --out_dir=out/full_attention
chunk_size = 0
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 and 2,000 steps since issue 20)
max_iters = 1800
