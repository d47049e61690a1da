# Ablation: CoMeT with the temporary memory only (S4), no global memory (S3): no readout tokens, and what
# leaves the 32-slot FIFO (4 chunks of 8 compression tokens) is gone. Everything else as config/comet.py.
# python train.py config/temp_only.py --out_dir=out/temp_only
n_global = 0
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 and 2,000 steps since issue 20)
max_iters = 1800
