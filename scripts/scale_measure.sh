# docs/scale.md's validation: the plan next to measured fp32 training steps on this CPU (live tensors and resident memory), for the tiny
# and the 30M shapes, with and without activation checkpointing. Run from the repository root.
for m in "tiny --context=4096 --batch=4 --chunk_size=64 --n_global=16 --temp_budget=32" \
         "30M --context=4096 --batch=2 --chunk_size=256 --n_global=16 --temp_budget=64"; do
  for ck in False True; do
    echo "== $m checkpoint_activations=$ck"
    MALLOC_MMAP_THRESHOLD_=65536 python -m scripts.plan --model=$m --dtype=float32 --measure --threads=2 --gpu_gib=24 \
      --checkpoint_activations=$ck
  done
done
# the same 30M step sharded over two ranks (FSDP2, gloo, one thread each): the per-rank peak
for ck in False True; do
  echo "== 30M dp=2 checkpoint_activations=$ck"
  MALLOC_MMAP_THRESHOLD_=65536 torchrun --standalone --nproc_per_node=2 -m scripts.plan --model=30M --context=4096 --batch=2 \
    --chunk_size=256 --n_global=16 --temp_budget=64 --dtype=float32 --measure --threads=1 --gpu_gib=24 --dp=2 \
    --checkpoint_activations=$ck
done
