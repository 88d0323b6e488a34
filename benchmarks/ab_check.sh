#!/usr/bin/env bash
# A/B of the GPU decode step between an earlier commit of this package and the working tree, on one GPU in one
# device call: run from the repository root on the GPU machine.
#
#   # here, before the call: the earlier commit's package into .base (git-ignored), then carry it with the wheels
#   rm -rf .base && mkdir .base && git archive <commit> pyproject.toml formats runtime converter compare | tar -x -C .base
#   bash benchmarks/ab_check.sh             # carry: .whl, .base; timeout_s=560 (AB_SECONDS=530 by default)
#
# Why: a kernel change that keeps the arithmetic (the same tokens, bit for bit) can only be judged by its speed
# against the code it replaces, on the same machine, and device sessions draw different machines (the same
# default measured 944-1,078 tok/s over three H200s). Both trees run the working tree's bench_gpu.py (the harness)
# on the same random 2B-4T-shaped file (seed 0), each tree in its own processes with its own tile cache (each
# searches its own tiles and pack warps: the search is part of the default), alternating base, new, base, new;
# then the GPU tests of the kernels the working tree changed. Each process times the greedy default twice, then
# the sampled rows (top-p alone and top-k 50 + top-p, each with the draw kernels and with torch's ops) and the
# prefill of the 512-token prompt; the last one also profiles the step. About 7-8 minutes.
set -u -o pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
START=$SECONDS
TOTAL=${AB_SECONDS:-530}  # the call's timeout_s less a margin: every step below fits in it
[ -f .base/pyproject.toml ] || { echo "error: no .base/pyproject.toml: see the header of this script" >&2; exit 2; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

for tree in base new; do  # each tree's package (no dependencies) into its own folder, with the carried wheels
  src=.; [ "$tree" = base ] && src=.base
  # a warm machine keeps /tmp from the call before: pip --target keeps a package already there, so the site is
  # made afresh (the tile caches stay: a tree's picks are its own either way)
  rm -rf "/tmp/site_$tree" && mkdir -p "/tmp/site_$tree" "/tmp/cache_$tree"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/site_$tree" .whl/*.whl
  fi
  timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir --target "/tmp/site_$tree" "$src" \
    > "$OUT/pip_$tree.log" 2>&1 || { echo "error: pip install of $tree failed (pip_$tree.log)" | tee -a "$OUT/env.txt"; exit 1; }
done

# the user's first run, with the working tree: the demo model converted and generated from by bitnet-run's
# default, the step search on and no tile cache. The tests run with BITNET158_AUTOTUNE=0 (no search), and a crash
# in the search of every first capture once hid behind that
rm -rf /tmp/cache_first
export PYTHONPATH=/tmp/site_new  # for the two CLIs below only: unset after them
python3 -c "from bitnet158.converter.cli import main; main()" hf-to-packed examples/tiny-bitnet -o /tmp/tiny.bin --force \
  > "$OUT/first_run.log" 2>&1 &&
  XDG_CACHE_HOME=/tmp/cache_first timeout 120 env -u BITNET158_AUTOTUNE python3 -c "from bitnet158.runtime.cli import main; main()" \
  /tmp/tiny.bin --prompt "Blessed are the" -n 24 >> "$OUT/first_run.log" 2>&1
echo "first run of bitnet-run (demo model, step search on, empty cache) exit: $? ($((SECONDS - START)) s in)"
tail -n 3 "$OUT/first_run.log"
unset PYTHONPATH

# each step gets at most its cap and what is left of AB_SECONDS, and a step with under 40 s left is skipped. The
# first process of each tree compiles its kernels and searches its tiles (cached for its second process), so it
# gets the longest cap
budget() {  # budget CAP: the seconds the next step may take (0: skip it)
  local t=$((TOTAL - (SECONDS - START) - 15))
  [ "$t" -gt "$1" ] && t=$1
  [ "$t" -lt 40 ] && t=0
  echo "$t"
}
run() {  # run TREE N CAP EXTRA...: the default twice (then the sampled rows) in one process of TREE's package
  local tree=$1 n=$2 t; t=$(budget "$3"); shift 3
  if [ "$t" = 0 ]; then echo "$tree run $n: skipped (no time left)"; return; fi
  PYTHONPATH="/tmp/site_$tree" XDG_CACHE_HOME="/tmp/cache_$tree" timeout -k 5 "$t" python3 benchmarks/bench_gpu.py \
    --variants default,default --no-micro --no-eager --no-checks --runs 3 --budget-s $((t - 15)) --tmp /tmp/ab --reuse-file \
    --json "$OUT/ab_${tree}_$n.json" "$@" > "$OUT/ab_${tree}_$n.log" 2>&1
  echo "$tree run $n exit: $? ($((SECONDS - START)) s in)"
  grep -E "^decode |^prefill |searched" "$OUT/ab_${tree}_$n.log" | head -n 14
}
run base 1 150
run new 1 150
run base 2 90
run new 2 100 --profile

# the GPU tests of the kernels the working tree changed, most telling first (fixed launch configs, as
# device_check.sh's): the step search (the default's first capture: its pack-warp search once failed there),
# every decode variant against the default, the packed GEMV, the graph decoder,
# the folded kernels, the attention and its combine, the sampler's modes, the int8 head, the plain GEMV
T=tests/test_kernels.py
t=$(budget 170)
if [ "$t" = 0 ]; then
  echo "GPU tests: skipped (no time left)"
else
  PYTHONPATH=/tmp/site_new BITNET158_AUTOTUNE=0 XDG_CACHE_HOME=/tmp/cache_tests timeout "$t" python3 -m pytest -q -m gpu \
    -p no:cacheprovider "$T::test_gpu_search_tiles_times_the_decode_step" "$T::test_gpu_decode_variants_follow_the_default" "$T::test_gpu_packed_gemv" \
    "$T::test_gpu_graph_decoder_matches_eager[False]" "$T::test_gpu_folded_kernels_and_argmax_in_a_graph" \
    "$T::test_gpu_decode_attention_bf16" "$T::test_gpu_sample_in_a_graph" "$T::test_gpu_quantize_and_head_exact" \
    "$T::test_gpu_bitlinear_exact[1-2560-6912]" "$T::test_gpu_bitlinear_exact[3-37-320]" 2>&1 \
    | tee "$OUT/pytest_gpu.log" | tail -n 15
fi

python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = sorted(out.glob("ab_*_*.json"), key=lambda p: (p.stem.split("_")[2], p.stem.split("_")[1]))
print("\ndecode tok/s, the 2B-4T-shaped random model (each timing of each process; base = the earlier commit)")
for f in runs:
    for name, row in json.loads(f.read_text()).get("decode", {}).items():
        rates = [x for x in (*row.get("earlier_tok_s", []), row.get("tok_s")) if x]
        what = "greedy" if "sampled" not in name else name.split("sampled", 1)[1].strip()
        print(f"{f.stem[3:]:<8} {what:<48} {'  '.join(f'{x:,.1f}' for x in rates)}")
    pre = json.loads(f.read_text()).get("prefill", {}).get("triton")
    if pre:
        print(f"{f.stem[3:]:<8} {'prefill of ' + str(pre['tokens']) + ' tokens':<48} {pre['tok_s']:,.0f}")
EOF
