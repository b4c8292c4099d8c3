python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=$OUT; date -u
for s in ViG-S ViG-T ViG-H; do
  timeout 330 python tools/bench.py attention --cases gated --mode both --impl fla --filter $s --iters 1 --warmup 1 > /tmp/warm_$s.log 2>&1 &
done
export VISIONATTN_AUTOTUNE=0
timeout 320 python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf tests/kernels/test_gated.py tests/ops/test_gated.py tests/nn/test_gated_attention2d.py tests/kernels/test_launch.py > $R/t_gated.log 2>&1 &
timeout 320 python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf tests/kernels/test_linear.py tests/kernels/test_linear_infer.py tests/kernels/test_sparse_linear.py tests/ops/test_sparse_linear.py > $R/t_lin_sla.log 2>&1 &
timeout 320 python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf tests/kernels/test_block_sparse_tma.py tests/kernels/test_block_sparse.py tests/ops/test_neighborhood.py tests/ops/test_block_sparse.py > $R/t_bs.log 2>&1 &
timeout 320 python -m pytest -v -p no:randomly -p no:cacheprovider -rf tests/kernels/test_launch_sites.py > $R/t_sites.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE; mkdir -p /tmp/g
date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED-lines"; grep -E "passed|failed|FAILED|Error" $f | tail -4; done
for s in ViG-S ViG-T ViG-H; do
  timeout 80 python tools/bench.py attention --cases gated --mode both --impl =ours,=ours-logits,fla --cuda-graph --iters 10 --warmup 3 --filter $s --out /tmp/g/gated_$s > /tmp/g/gated_$s.log 2>&1; tar czf $R/g.tgz -C /tmp/g .; grep "^|\|###" /tmp/g/gated_$s.log | grep -v "^|---\|^| impl" | cut -c1-100
  date -u
done
