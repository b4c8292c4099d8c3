python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R; date -u; git log --oneline | head -1
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
export VISIONATTN_AUTOTUNE=0
timeout 330 $P tests/kernels/test_block_sparse.py tests/kernels/test_block_sparse_tma.py > $R/t_bs.log 2>&1 &
timeout 330 $P tests/kernels/test_linear.py tests/kernels/test_linear_infer.py tests/ops/test_linear.py > $R/t_lin.log 2>&1 &
timeout 330 $P tests/kernels/test_sparse_linear.py tests/ops/test_sparse_linear.py tests/nn/test_sparse_linear_attention.py > $R/t_sla.log 2>&1 &
timeout 330 $P tests/kernels/test_launch.py tests/kernels/test_launch_sites.py tests/ops/test_neighborhood.py tests/ops/test_block_sparse.py > $R/t_misc.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE
date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED-lines"; grep -E "^E |passed|failed|^FAILED" $f | head -8; done
timeout 60 python gpu_s9/perm_probe.py 2>&1 | tail -12
date -u
timeout 150 python docs/benchmarks/scripts_s8/linear_ab.py --profile > $R/linear_ab.log 2>&1; grep -v "^\s*$" $R/linear_ab.log | head -80
date -u
tar czf $OUT/c1.tgz -C $R .
