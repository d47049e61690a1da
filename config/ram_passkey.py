# RAM (docs/design.md S9) on the passkey task, at the ablations' shape and recipe: 50-token segments, a quarter
# read closely (4x), the rest skimmed to one vector each.
# python -m ram.train_ram config/ram_passkey.py --out_dir=out/ram_passkey
method = "ram"
task = "passkey"
chunk_size = 0            # RAM's encoder and decoder are plain decoders
segment = 50
keep_ratio = 0.25
contrast_weight = 0.1
max_iters = 1500
eval_interval = 300
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
max_len = 512
