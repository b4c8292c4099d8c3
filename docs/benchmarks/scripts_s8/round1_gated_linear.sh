python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
date -u
timeout 100 python tools/bench.py attention --cases gated --mode fwd --filter ViG-T --impl =ours,=ours-logits,unseg --cuda-graph --iters 50 --out $OUT/gated_t_a 2>&1 | grep "^|" | tail -4
timeout 100 python tools/bench.py attention --cases gated --mode fwd --filter ViG-T --impl =ours,=ours-logits,unseg --cuda-graph --iters 50 --out $OUT/gated_t_b 2>&1 | grep "^|" | tail -4
timeout 150 python tools/bench.py attention --cases gated --mode fwd --filter ViG- --impl =ours,=ours-logits,unseg --cuda-graph --out $OUT/gated_fwd_all 2>&1 | grep -v "^\[bench\]" | grep "^|\|###"
timeout 100 python tools/bench.py attention --cases gated --mode fwd+bwd --filter ViG- --impl =ours,unseg --cuda-graph --iters 10 --warmup 3 --out $OUT/gated_train 2>&1 | grep "^|\|###"
date -u
timeout 240 python tools/bench.py attention --cases linear --mode fwd --impl =ours-plain,=ours-plain-s7,=ours-mala,=ours-mala-s7,=ours-rala,=ours-rala-s7,hbm --cuda-graph --iters 10 --warmup 3 --out $OUT/linear_fwd_s8 2>&1 | grep "^|\|###"
date -u
