# The baseline RAM must beat (ram.py): a plain decoder that reads only the last tokens of the context that
# fit RAM's budget at keep_ratio (k segments' tokens + one row per other segment), then the question.
# python train.py config/truncate_facts.py --out_dir=out/truncate_facts
method = "truncate"
chunk_size = 0
task = "facts"
segment = 50
keep_ratio = 0.25
min_len = 256
max_iters = 2000
eval_interval = 200
edge_depths = 0.1          # as its documented run was trained (the default became 0.2 with issue 20)
chunk_align = "left"       # as its documented run was trained (half the batches right-aligned since issue 20)
batch_threads = 1          # as its documented run was trained (each batch in 2 slices on 2 threads since issue 20)
max_len = 512              # as its documented run was trained (768 since issue 20)
