# The cheap check behind the SmolLM2 recipe: three chunks (the key's, one filler chunk, the question's) and no FIFO,
# so every key must travel in the global memory; applied after config/finetune_smollm2.py, whose recipe it then
# runs (docs/smollm2.md compares three arms):
# python train.py config/finetune_smollm2.py config/smollm2_3chunk_check.py --out_dir=out/check_sink
# python train.py config/finetune_smollm2.py config/smollm2_3chunk_check.py --sink_token=-1 --gate_bias=0 \
#     --readout_init=mean --out_dir=out/check_attention        # without the sink, the gate bias and apart readouts
# python train.py config/finetune_smollm2.py config/smollm2_3chunk_check.py --unfreeze= --sink_token=-1 \
#     --gate_bias=0 --readout_init=mean --out_dir=out/check_frozen                # and the base frozen
temp_budget = 0           # no FIFO: only the global memory carries the key
min_len = 384             # 3 chunks of 128
max_len = 384
curriculum = 0.0
far_keys = 1.0            # every key in the first chunk or early in the second (train.far_depth)
lr = 1e-4                 # unfrozen attention: a pretrained model's fine-tuning rate
memory_lr_mult = 20.0     # the memories at 2e-3, as in config/finetune_smollm2.py
max_iters = 100
eval_interval = 50
ckpt_interval = 25
