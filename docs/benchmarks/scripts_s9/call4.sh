python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=/tmp/r4; mkdir -p $R; date -u
ls visionattn/kernels/row_order.py visionattn/kernels/row_gather.py; grep -c "_BIG_STATE_CONFIGS + _SMALL" visionattn/kernels/linear_configs.py
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
export VISIONATTN_AUTOTUNE=0
timeout 200 $P tests/kernels/test_block_sparse_row_order.py tests/kernels/test_block_sparse_tma.py tests/kernels/test_block_sparse.py > $R/t_bs.log 2>&1 &
timeout 200 $P tests/kernels/test_row_gather.py tests/ops/test_gather.py tests/ops/test_neighborhood.py tests/kernels/test_launch_sites.py > $R/t_gather.log 2>&1 &
timeout 200 $P tests/kernels/test_linear.py -k split_state_real_size > $R/t_lin.log 2>&1 &
timeout 200 $P tests/ops/test_block_sparse.py tests/nn/test_routing_attention.py > $R/t_ops.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE; date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED"; grep -E "^E |passed|failed|^FAILED" $f | head -6; done
B="python tools/bench.py attention"
timeout 60 $B --cases block_sparse --mode fwd --filter "FLUX-2048 B1 H24 N16896 d128 random" --impl =ours,=ours-unordered,=sdpa-cudnn --cuda-graph --iters 10 --warmup 3 --out $R/bs_flux_random_order > $R/bs_random.log 2>&1; grep "^|" $R/bs_random.log | cut -c1-200
date -u
timeout 80 $B --cases neighborhood --mode fwd --filter "HunyuanVideo (30,48,80) w(18,24,24) B1" --impl =ours,=ours-kernel,=sdpa,ours-permute --cuda-graph --iters 5 --warmup 2 --out $R/nbhd_hy_gather > $R/nbhd.log 2>&1; grep "^|\|###" $R/nbhd.log | cut -c1-200
date -u
tar czf $OUT/c4.tgz -C $R .
