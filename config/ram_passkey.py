# RAM (SPEC S9, ram.py) on the passkey task: the same tiny shape and recipe as config/comet.py (the default before issue 20),
# read as 50-token segments of which a quarter are kept (4x), the rest skimmed to one vector each.
# python train.py config/ram_passkey.py --out_dir=out/ram_passkey
method = "ram"
chunk_size = 0            # RAM's encoder and decoder are plain decoders
task = "passkey"
segment = 50
keep_ratio = 0.25
contrast_weight = 0.1     # as ram.SETTINGS' default (the paper's 1 stalled this tiny model: docs/ram.md)
max_iters = 1500
eval_interval = 300
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 since issue 20)
