# Baseline: a plain decoder whose tokens attend to the last 48 positions only: as many as CoMeT's memories
# hold per layer (16 global + 32 temporary slots; CoMeT's tokens also see the earlier tokens of their
# chunk). Same shape and recipe as config/comet.py. It forgets what has left its window (4 layers reach
# back at most 4 x 47 tokens). Its streaming KV cache is not trimmed to the window: memory grows with the
# context, accuracy is unaffected; eval_passkey.py needs --block_size=N to read N tokens.
# python train.py config/sliding_window.py --out_dir=out/sliding_window
chunk_size = 0
window = 48
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 and 2,000 steps since issue 20)
max_iters = 1800
