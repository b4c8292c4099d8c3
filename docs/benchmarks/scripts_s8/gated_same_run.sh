python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
python -c "import torch, triton, fla; print(torch.__version__, triton.__version__, fla.__version__)"
date -u
# phase 1: fill Triton's on-disk compile cache with fla's autotune configs (3 shapes in parallel; timings discarded)
for s in ViG-S ViG-T ViG-H; do
  timeout 260 python tools/bench.py attention --cases gated --mode both --impl fla --filter $s --iters 1 --warmup 1 > $OUT/warm_$s.log 2>&1 &
done
wait
date -u
# phase 2: one process per shape, ours and fla in the same process, sequential
for s in ViG-T ViG-H ViG-S; do
  timeout 150 python tools/bench.py attention --cases gated --mode both --impl =ours,=ours-logits,fla --cuda-graph --iters 10 --warmup 3 --filter $s --out $OUT/gated_$s 2>&1 | grep -v "^\[bench\]" | tail -14
  date -u
done
