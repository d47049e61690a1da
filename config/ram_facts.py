# RAM (SPEC S9, ram.py) on the multi-fact question task: four facts "Name's code is K." hidden in filler,
# the question asks for one person's code. 4x: a quarter of the context read closely, the rest skimmed.
# python train.py config/ram_facts.py --out_dir=out/ram_facts
method = "ram"
chunk_size = 0            # RAM's encoder and decoder are plain decoders
task = "facts"
segment = 50
keep_ratio = 0.25
contrast_weight = 0.1     # as ram.SETTINGS' default (the paper's 1 stalled this tiny model: docs/ram.md)
min_len = 256             # four facts + question + answer take 135 tokens; leave room for filler
max_iters = 5000          # the measured model (docs/ram.md): this file with --max_iters=3000 until step 2,073,
eval_interval = 500       # then resumed with --max_iters=5000 (the cosine schedule stretched from there on)
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 since issue 20)
