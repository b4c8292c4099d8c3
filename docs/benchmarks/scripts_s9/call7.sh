python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
cd gpu_s9/clean && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
R=/tmp/r7; mkdir -p $R; date -u; echo "snapshot of HEAD c1596be"
B="python tools/bench.py"
P="python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short"
export VISIONATTN_AUTOTUNE=0
timeout 270 $P tests/kernels/test_routed.py tests/ops/test_routed.py tests/nn/test_routing_attention.py > $R/t_routed.log 2>&1 &
timeout 270 $P tests/backbones/test_biformer.py > $R/t_bb.log 2>&1 &
wait
unset VISIONATTN_AUTOTUNE; date -u
for f in $R/t_*.log; do echo "== $f: $(grep -c PASSED $f) PASSED, $(grep -c FAILED $f) FAILED"; grep -E "^E |passed|failed|^FAILED" $f | head -8; done
timeout 240 $B models --cases models_biformer --mode both --filter "224px biformer_tiny" --iters 10 --warmup 3 --out $R/models_biformer_224 > $R/bf224.log 2>&1; grep "^|\|###\|rel. error\|Error\|error" $R/bf224.log | grep -v "^|---" | cut -c1-150
date -u
tar czf $OUT/c7.tgz -C $R .
