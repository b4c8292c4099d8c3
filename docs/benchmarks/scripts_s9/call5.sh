python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
cd gpu_s9/clean && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
R=/tmp/r5; mkdir -p $R; date -u; echo "snapshot of HEAD 45faa47"
B="python tools/bench.py"
# fill Triton's disk cache with fla's autotuning for the ViG training rows (timings discarded)
for f in "train 1024px vig_tiny" "train 224px vig_small"; do
  timeout 300 $B models --cases models_vig --mode fwd+bwd --filter "$f" --impl "fla" --iters 1 --warmup 1 > "$R/warm_${f// /_}.log" 2>&1 &
done
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
export VISIONATTN_AUTOTUNE=0
timeout 270 $P tests/kernels/test_routed.py tests/ops/test_routed.py tests/nn/test_routing_attention.py > $R/t_routed.log 2>&1 &
timeout 270 $P tests/backbones -k "biformer or agent" > $R/t_bb.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE; date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED"; grep -E "^E |passed|failed|^FAILED" $f | head -8; done
grep -h "^|" $R/warm_*.log | cut -c1-120
timeout 240 $B models --cases models_biformer --mode both --filter "224px biformer_tiny" --iters 10 --warmup 3 --out $R/models_biformer_224 > $R/bf224.log 2>&1; grep "^|\|###\|rel. error\|Error\|error" $R/bf224.log | grep -v "^|---" | cut -c1-150
date -u
tar czf $OUT/c5.tgz -C $R .
