python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=/tmp/r3; mkdir -p $R; date -u
git checkout -- visionattn tools tests && echo "HEAD $(git log --oneline | head -1)"
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
export VISIONATTN_AUTOTUNE=0
timeout 270 $P tests/kernels/test_block_sparse_row_order.py tests/kernels/test_block_sparse_tma.py tests/kernels/test_block_sparse.py > $R/t_bs.log 2>&1 &
timeout 270 $P tests/kernels/test_row_gather.py tests/ops/test_gather.py tests/ops/test_neighborhood.py tests/kernels/test_launch_sites.py > $R/t_gather.log 2>&1 &
timeout 270 $P tests/kernels/test_linear.py -k split_state_real_size > $R/t_lin.log 2>&1 &
timeout 270 $P tests/ops/test_block_sparse.py tests/nn/test_routing_attention.py > $R/t_ops.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE; date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED"; grep -E "^E |passed|failed|^FAILED" $f | head -6; done
B="python tools/bench.py attention"
timeout 200 $B --cases block_sparse --mode both --filter random --impl =ours,=ours-unordered,=sdpa-cudnn,=flex --cuda-graph --iters 10 --warmup 3 --out $R/bs_random_order > $R/bs_random.log 2>&1; grep "^|\|###" $R/bs_random.log | cut -c1-200
date -u
for o in 1 0; do
VISIONATTN_BSA_ROW_ORDER=$o timeout 100 $B --cases neighborhood --mode fwd --filter "HunyuanVideo (30,48,80) w(18,24,24) B1" --impl =ours,=ours-kernel,=sdpa,ours-permute --cuda-graph --iters 5 --warmup 2 --out $R/nbhd_hy_order$o > $R/nbhd_$o.log 2>&1; grep "^|\|###" $R/nbhd_$o.log | cut -c1-200
date -u
done
timeout 60 python tools/profile_model.py biformer_tiny --img-size 224 --batch 256 --rows 30 > $R/prof_bf224.log 2>&1; head -50 $R/prof_bf224.log | cut -c1-100,150-200
date -u
tar czf $OUT/c3.tgz -C $R .
