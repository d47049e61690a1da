# The baseline RAM must beat: a plain decoder that reads only the last tokens of the context that fit RAM's budget
# at keep_ratio (k segments' tokens + one row per other segment), then the question.
# python -m ram.train_ram config/truncate_facts.py --out_dir=out/truncate_facts
method = "truncate"
task = "facts"
chunk_size = 0
segment = 50
keep_ratio = 0.25
min_len = 256
max_len = 512
max_iters = 2000
eval_interval = 200
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
