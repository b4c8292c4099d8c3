python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export PYTHONUNBUFFERED=1
R=/tmp/r2; mkdir -p $R; date -u
git status --short | grep -v "^??" | head -20; git checkout -- visionattn tools tests && echo "restored HEAD $(git log --oneline | head -1)"
B="python tools/bench.py"
timeout 120 $B models --cases models_vig --mode fwd --filter "infer 1024px vig_tiny" --impl "=vig_tiny (ours),=vig_tiny attention-free (bound),=deit_tiny (timm)" --iters 10 --warmup 3 --out $R/models_vig_1024_bound > $R/vig1024.log 2>&1; grep "^|" $R/vig1024.log | cut -c1-160
date -u
timeout 120 $B models --cases models_vig --mode fwd --filter "infer 224px vig_small" --impl "=vig_small (ours),=vig_small attention-free (bound),=deit_base (timm)" --iters 10 --warmup 3 --out $R/models_vig_224_bound > $R/vig224.log 2>&1; grep "^|" $R/vig224.log | cut -c1-160
date -u
timeout 120 $B models --cases models_mavit --mode fwd --filter "infer 1024px tiny linear" --impl "=mavit_tiny (ours),=mavit_tiny attention-free (bound),=ravlt_tiny (ours),=ravlt_tiny attention-free (bound),=deit_tiny (timm)" --iters 10 --warmup 3 --out $R/models_mavit_1024_bound > $R/mavit1024.log 2>&1; grep "^|" $R/mavit1024.log | cut -c1-160
date -u
timeout 120 $B models --cases models_biformer --mode fwd --filter "infer 224px biformer_tiny" --iters 10 --warmup 3 --out $R/models_biformer_224_bound > $R/bf224.log 2>&1; grep "^|" $R/bf224.log | cut -c1-160
date -u
timeout 90 $B attention --cases block_sparse --mode both --filter "Wan2.1-480p B1 H12 (21,30,52) d128 dense" --impl "=ours,=sdpa-flash,=sdpa-cudnn" --cuda-graph --iters 5 --warmup 2 --out $R/bs_wan_dense_fwdbwd > $R/wan.log 2>&1; grep "^|" $R/wan.log | cut -c1-200
date -u
timeout 90 python tools/profile_model.py mavit_tiny --img-size 1024 --batch 32 --kwargs attn_layout=linear --rows 40 > $R/prof_mavit1024.log 2>&1; head -60 $R/prof_mavit1024.log | cut -c1-180
date -u
tar czf $OUT/c2.tgz -C $R .
