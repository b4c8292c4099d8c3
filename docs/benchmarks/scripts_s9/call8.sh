python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
cd gpu_s9/clean && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
R=/tmp/r8; mkdir -p $R; date -u; echo "snapshot of HEAD 4cff9d5"
VISIONATTN_AUTOTUNE=0 timeout 100 python -m pytest -m gpu -v -p no:randomly -p no:cacheprovider -rf --tb=short tests/backbones/test_biformer.py -k compile > $R/t_bb_compile.log 2>&1; grep -E "^E |passed|failed" $R/t_bb_compile.log | head -4
tar czf $OUT/c8.tgz -C $R .
timeout 270 python tools/bench.py models --cases models_biformer --mode both --filter "1024px biformer_tiny" --iters 5 --warmup 2 --out $R/models_biformer_1024 > $R/bf1024.log 2>&1; grep "^|\|###\|rel. error" $R/bf1024.log | grep -v "^|---" | cut -c1-150
date -u
tar czf $OUT/c8.tgz -C $R .
