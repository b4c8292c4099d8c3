python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
date -u
timeout 280 python tools/bench.py models --cases models_vig --mode fwd --filter "infer 1024px vig_tiny" --impl "vig_tiny (ours,deit_tiny" --iters 10 --warmup 3 --out $OUT/models_vig_compile 2>&1 | grep -v "^\[bench\]" | tail -12
date -u
timeout 280 python tools/bench.py models --cases models_mavit --mode fwd --filter "infer 1024px tiny linear" --impl "mavit_tiny (ours,deit_tiny" --iters 10 --warmup 3 --out $OUT/models_mavit_compile 2>&1 | grep -v "^\[bench\]" | tail -12
date -u
