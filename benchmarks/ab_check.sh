#!/usr/bin/env bash
# A/B of the GPU decode step between an earlier commit of this package and the working tree, on one GPU in one
# device call: run from the repository root on the GPU machine.
#
#   # here, before the call: the earlier commit's package into .base (git-ignored), then carry it with the wheels
#   rm -rf .base && mkdir .base && git archive <commit> pyproject.toml formats runtime converter compare | tar -x -C .base
#   bash benchmarks/ab_check.sh             # carry: .whl, .base; timeout_s=560; logs and JSON under $OUT
#
# Why: a kernel change that keeps the arithmetic (the same tokens, bit for bit) can only be judged by its speed
# against the code it replaces, on the same machine, and device sessions draw different machines (the same
# default measured 944-1,078 tok/s over three H200s). Both trees run the working tree's bench_gpu.py (the harness)
# on the same random 2B-4T-shaped file (seed 0), each tree in its own processes with its own tile cache (each
# searches its own tiles and pack warps: the search is part of the default), alternating base, new, base, new;
# then the GPU tests of the kernels the working tree changed. Each process times the greedy default twice, then
# the sampled rows (top-p alone and top-k 50 + top-p, each with the draw kernels and with torch's ops); the last
# one also profiles the step. About 7-8 minutes.
set -u -o pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
[ -f .base/pyproject.toml ] || { echo "error: no .base/pyproject.toml: see the header of this script" >&2; exit 2; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

for tree in base new; do  # each tree's package (no dependencies) into its own folder, with the carried wheels
  src=.; [ "$tree" = base ] && src=.base
  mkdir -p "/tmp/site_$tree" "/tmp/cache_$tree"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "/tmp/site_$tree" .whl/*.whl
  fi
  timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir --target "/tmp/site_$tree" "$src" \
    > "$OUT/pip_$tree.log" 2>&1 || { echo "error: pip install of $tree failed (pip_$tree.log)" | tee -a "$OUT/env.txt"; exit 1; }
done

run() {  # run TREE N EXTRA...: the default twice in one process of TREE's package
  local tree=$1 n=$2; shift 2
  PYTHONPATH="/tmp/site_$tree" XDG_CACHE_HOME="/tmp/cache_$tree" timeout -k 5 110 python3 benchmarks/bench_gpu.py \
    --variants default,default --no-micro --no-eager --no-checks --runs 3 --budget-s 100 --tmp /tmp/ab --reuse-file \
    --json "$OUT/ab_${tree}_$n.json" "$@" > "$OUT/ab_${tree}_$n.log" 2>&1
  echo "$tree run $n exit: $?"
  grep -E "^decode |CORRECTNESS|searched" "$OUT/ab_${tree}_$n.log" | head -n 12
}
run base 1
run new 1
run base 2
run new 2 --profile

# the GPU tests of what the working tree changed (fixed launch configs, as device_check.sh's)
PYTHONPATH=/tmp/site_new BITNET158_AUTOTUNE=0 XDG_CACHE_HOME=/tmp/cache_tests timeout 170 python3 -m pytest -q -m gpu \
  -p no:cacheprovider tests/test_kernels.py -k "bitlinear_exact or quantize_and_head or packed or folded or persistent or decode_attention or variants_follow or graph_decoder or sample_in_a_graph" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -n 15

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
EOF
