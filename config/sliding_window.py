# Baseline: a plain decoder whose tokens attend to the last 48 positions only, as many cached positions as
# CoMeT's memories hold per layer (16 global + 32 temporary slots; CoMeT's tokens also see the earlier
# tokens of their chunk). Same shape and recipe as config/comet.py. It forgets what left its window.
# python train.py config/sliding_window.py --out_dir=out/sliding_window
chunk_size = 0
window = 48
