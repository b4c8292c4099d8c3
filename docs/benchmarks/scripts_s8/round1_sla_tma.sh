python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
date -u
for r in a b; do
timeout 120 python tools/bench.py attention --cases sparse_linear --mode fwd --iters 10 --warmup 2 --impl =ours-sla,=sdpa-flash --filter "SLA-bench B2 H16 N32760 d128 topk 5%" --cuda-graph --out $OUT/sla_fwd_$r 2>&1 | grep "^|"
done
date -u
TRITON_PRINT_AUTOTUNING=1 timeout 200 python tools/bench.py attention --cases block_sparse --mode fwd --filter FLUX --impl ours,sdpa --cuda-graph --iters 10 --warmup 3 --out $OUT/bs_fwd_flux_tma > $OUT/bs_flux.log 2>&1; grep "^|\|###\|best config" $OUT/bs_flux.log | cut -c1-220
date -u
TRITON_PRINT_AUTOTUNING=1 timeout 150 python tools/bench.py attention --cases block_sparse --mode fwd --filter "s(16, 8, 8)" --impl ours,sdpa --cuda-graph --iters 10 --warmup 3 --out $OUT/bs_fwd_hunyuan_gna_tma > $OUT/bs_hy.log 2>&1; grep "^|\|###\|best config" $OUT/bs_hy.log | cut -c1-220
date -u
