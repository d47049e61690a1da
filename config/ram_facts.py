# RAM (docs/design.md S9) on the facts task: four facts "Name's code is K." hidden in the filler, the question
# asks for one person's code; 4x: a quarter of the context read closely, the rest skimmed. docs/ram.md's model ran
# this file with --max_iters=3000 to step 2,073, then resumed with --max_iters=5000.
# python -m ram.train_ram config/ram_facts.py --out_dir=out/ram_facts
method = "ram"
task = "facts"
chunk_size = 0            # RAM's encoder and decoder are plain decoders
segment = 50
keep_ratio = 0.25
contrast_weight = 0.1
min_len = 256             # four facts, the question and the answer take 135 tokens
max_len = 512
max_iters = 5000
eval_interval = 500
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
