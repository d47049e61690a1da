# CoMeT as `python train.py` trained it before issue 20 (edge_depths 0.1, sequences of 128-512 tokens, 1,800
# steps: below); every other setting at train.py's default (4 layers, d 128, chunks of 64 tokens, 16 global
# slots, a FIFO of 32). The reference row of docs/ablations.md; the other variants change one
# thing each.
# python train.py config/comet.py --out_dir=out/comet
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 and 2,000 steps since issue 20)
max_iters = 1800
