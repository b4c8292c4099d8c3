python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
date -u
for r in a b; do
timeout 100 python tools/bench.py attention --cases sparse_linear --mode fwd --iters 10 --warmup 2 --impl =ours-sla,=sdpa-flash --filter "SLA-bench B2 H16 N32760 d128 topk 5%" --cuda-graph --out $R/sla_fwd_$r > $R/sla_$r.log 2>&1; grep "^|" $R/sla_$r.log | cut -c1-200
done
date -u
i=0
for f in DeiT FLUX "Wan2.1-480p B1 H12 (21,30,52) d128 dense" "Wan2.1-480p B1 H12 (21,30,52) d128 nbhd"; do
i=$((i+1))
TRITON_PRINT_AUTOTUNING=1 timeout 150 python tools/bench.py attention --cases block_sparse --mode fwd --filter "$f" --impl ours,sdpa --cuda-graph --iters 10 --warmup 3 --out "$R/bs_$i" > "$R/bs_$i.log" 2>&1; grep "^|\|###\|best config" "$R/bs_$i.log" | cut -c1-200
date -u
done
VISIONATTN_BSA_TMA=1 timeout 200 python tools/bench.py attention --cases neighborhood --mode fwd --iters 5 --warmup 2 --cuda-graph --impl ours,sdpa --filter HunyuanVideo --out $R/nbhd_hunyuan_tma > $R/nbhd.log 2>&1; grep "^|\|###" $R/nbhd.log | cut -c1-200
date -u
tar czf $OUT/e.tgz -C $R .
