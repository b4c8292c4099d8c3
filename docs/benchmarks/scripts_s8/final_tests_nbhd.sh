python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1 VISIONATTN_AUTOTUNE=0
R=$OUT; date -u
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
timeout 300 $P -x tests/kernels/test_linear.py -k "split_state_real_size" > $R/u_linsplit.log 2>&1 &
timeout 300 $P tests/kernels/test_gated.py -k "every_config or deterministic or head_dims" > $R/u_gated.log 2>&1 &
timeout 300 $P tests/kernels/test_sparse_linear.py tests/ops/test_sparse_linear.py tests/nn/test_sparse_linear_attention.py > $R/u_sla.log 2>&1 &
timeout 300 $P tests/kernels/test_linear_infer.py tests/nn/test_linear_attention2d.py tests/ops/test_gated.py tests/nn/test_gated_attention2d.py > $R/u_misc.log 2>&1 &
wait
date -u
for f in $R/u_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED-lines"; grep -E "^E |passed|failed" $f | head -12; done
unset VISIONATTN_AUTOTUNE
timeout 120 python tools/bench.py attention --cases neighborhood --mode fwd --iters 5 --warmup 2 --cuda-graph --impl ours,sdpa --filter HunyuanVideo --out /tmp/nb > /tmp/nb.log 2>&1; grep "^|\|###" /tmp/nb.log | grep -v "^|---\|^| impl" | cut -c1-110
cp /tmp/nb.md $R/ 2>/dev/null; cp /tmp/nb.json $R/ 2>/dev/null
date -u
