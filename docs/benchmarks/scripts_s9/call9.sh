python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
cd gpu_s9/clean && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
R=/tmp/r9; mkdir -p $R; date -u; echo "snapshot of HEAD c1cef2c"
timeout 150 python tools/bench.py models --cases models_biformer --mode fwd --filter "agent" --iters 10 --warmup 3 --out $R/models_agent_bound > $R/agent.log 2>&1; grep "^|\|###" $R/agent.log | grep -v "^|---" | cut -c1-150
date -u
tar czf $OUT/c9.tgz -C $R .
