# The recall task (ram/tasks.py): eight codes "K48213." hidden in the filler, K a single token, and the question
# "Which code starts with K? K" asks for one. Every method trains with this one budget, at the lengths it is read
# at (256-1,024 tokens; evaluated at 512 and 1,024). docs/ram.md (the measured runs: scripts/recall_gpu_run.py):
#   python -m ram.train_ram config/recall.py --method=comet --out_dir=out/recall_comet                 # CoMeT
#   python -m ram.train_ram config/recall.py --method=comet --chunk_size=0 --out_dir=out/recall_full   # full attention
#   python -m ram.train_ram config/recall.py --method=truncate --chunk_size=0 --out_dir=out/recall_truncate
#   python -m ram.train_ram config/recall.py --method=ram --chunk_size=0 --out_dir=out/recall_ram      # RAM 4x, paper
#   python -m ram.train_ram config/recall.py --method=ram --chunk_size=0 --ram_query=alone --encoder_layers=2 \
#       --out_dir=out/recall_ram_alone                                                                 # authors' code
task = "recall"
method = "comet"          # each command above names its method
min_len = 256
max_len = 1024
chunk_size = 128          # CoMeT: 8 chunks at 1,024 tokens
batch_size = 32
max_iters = 2800
eval_interval = 500
ckpt_interval = 250
segment = 50              # RAM: 20 segments of context at 1,024 tokens, of which 4 are read closely at 0.25
keep_ratio = 0.25
contrast_weight = 0.1
edge_depths = 0.1
chunk_align = "left"
batch_threads = 1
