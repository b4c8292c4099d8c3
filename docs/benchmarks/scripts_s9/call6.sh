python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
cd gpu_s9/clean && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
R=/tmp/r6; mkdir -p $R; date -u; echo "snapshot of HEAD 45faa47"
B="python tools/bench.py"
for f in "train 1024px vig_tiny" "train 224px vig_small"; do
  timeout 150 $B models --cases models_vig --mode fwd+bwd --filter "$f" --iters 5 --warmup 2 --out "$R/models_vig_${f// /_}" > "$R/vig_${f// /_}.log" 2>&1; grep "^|\|###" "$R/vig_${f// /_}.log" | grep -v "^|---" | cut -c1-150
  date -u
done
timeout 200 $B attention --cases linear --mode both --impl =ours-plain,=ours-mala,=ours-rala,=ours-rala-rope-pairs,=hbm-copy --cuda-graph --iters 10 --warmup 3 --out $R/linear_variants > $R/linear.log 2>&1; grep "^|\|###" $R/linear.log | grep -v "^|---" | cut -c1-150
date -u
timeout 90 $B attention --cases sparse_linear --mode fwd --iters 10 --warmup 2 --impl =ours-sla,=sdpa-flash,=sdpa-cudnn --filter "SLA-bench B2 H16 N32760 d128 topk 5%" --cuda-graph --out $R/sla_fwd > $R/sla.log 2>&1; grep "^|" $R/sla.log | cut -c1-200
date -u
tar czf $OUT/c6.tgz -C $R .
