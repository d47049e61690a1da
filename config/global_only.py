# Ablation: CoMeT with the global memory only (S3), no temporary memory (S4): no compression tokens, no FIFO.
# Everything else as config/comet.py.
# python train.py config/global_only.py --out_dir=out/global_only
temp_budget = 0
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 and 2,000 steps since issue 20)
max_iters = 1800
