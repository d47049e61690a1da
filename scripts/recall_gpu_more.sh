# The second GPU run (docs/ram.md): full attention and CoMeT, which had not learned the recall task in the
# shared budget of 2,800 steps, trained on from the first call's checkpoints (carried in out/recall_{full,comet}).
export PYTHONUNBUFFERED=1; O=out/gpu2; mkdir -p $O
timeout -s INT 215 python3 -m ram.train_ram --init_from=resume --out_dir=out/recall_full --max_iters=8000 --threads=6 > $O/train_full.log 2>&1 &
timeout -s INT 215 python3 -m ram.train_ram --init_from=resume --out_dir=out/recall_comet --max_iters=4500 --threads=6 > $O/train_comet.log 2>&1 &
wait
for n in full comet; do
  timeout 50 python3 -m ram.eval_ram --ckpt=out/recall_$n/ckpt.pt --lengths=512,1024 --trials=100 --threads=6 --json=$O/recall_${n}_more.json > $O/eval_$n.log 2>&1 &
done
wait
for n in full comet; do cp out/recall_$n/log.jsonl $O/log_${n}_more.jsonl; done
