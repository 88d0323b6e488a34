#!/usr/bin/env bash
# The one device check of the GPU fast path (issue 5): run from the repository root on the GPU machine.
#
#   bash benchmarks/device_check.sh            # carry: .whl (the gguf wheel); logs and bench.json under $OUT
#   bash benchmarks/device_check.sh quick      # the same steps cut to about 7 minutes (timeout_s=600): the
#                                              # GPU tests of the attention kernel, the tile search, the decode
#                                              # variants, the graph decoder, the sampler and the argmax's
#                                              # ties (which the interpreter cannot check); the default and
#                                              # the default with PDL's early trigger (in every kernel, and in
#                                              # the packs only), each twice, alternating, and the default with
#                                              # the int8 head once (the first to go if time runs short), then
#                                              # sampled decoding with the kernel and with torch's ops; on both
#                                              # models; no eager baselines, transformers or microbenchmarks;
#                                              # --profile (the default's step and each sampled step, the
#                                              # step-gap probe, the attention at 80 to 4,096 cache slots
#                                              # pipelined and not, and the prefill's kernels). The folded
#                                              # attention and the L2 prefetch were measured on 2026-11-27 (no
#                                              # gain): the full run still times them
#
# Steps, each under its own timeout (about 7 minutes in all, at most 9.5; give the run timeout_s=600):
#   1. environment: GPU, driver, python, torch, triton, transformers              (-> $OUT/env.txt)
#   2. carried wheels (.whl/*.whl, e.g. gguf) into /tmp/site; our package (no deps) into /tmp/site
#   3. the GPU tests: pytest -m gpu tests/test_kernels.py (+ tests/test_runtime_gpu.py) (-> $OUT/pytest_gpu.log)
#   4. the trained demo model (examples/tiny-bitnet, converted here): bitnet-run's first run, bitnet-compare
#      against transformers on CUDA (-> $OUT/compare_demo.log), the correctness checks and every decode
#      variant on a network whose logits have real margins                        (-> $OUT/bench_demo.log, .json)
#   5. the benchmark on a random 2B-4T-shaped model, with transformers and torch.compile
#                                                                                    (-> $OUT/bench.log, bench.json)
# Each benchmark prints PASS/FAIL of its correctness check and a short table last.
set -u -o pipefail
MODE=${1:-full}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 --version
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

# 2. packages: the carried wheels, then this repository without its dependencies (all present there but gguf),
# into a fresh folder: on a warm machine pip --target keeps a package already there (2026-11-28: a whole call
# measured the previous call's code)
rm -rf /tmp/site && mkdir -p /tmp/site
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "warning: installing the carried wheels failed" | tee -a "$OUT/env.txt"
fi
if ! timeout 120 python3 -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir --target /tmp/site . \
    > "$OUT/pip.log" 2>&1; then
  # fallback: the package-dir mapping (bitnet158.runtime -> runtime/ ...) by hand, as symlinks
  echo "pip install of the package failed (see pip.log); using symlinks" | tee -a "$OUT/env.txt"
  mkdir -p /tmp/site/bitnet158
  for p in formats runtime converter compare; do ln -sfn "$PWD/$p" "/tmp/site/bitnet158/$p"; done
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import bitnet158.runtime.kernels as k, bitnet158.formats.packed; print('bitnet158 from', k.__file__)" 2>&1 | tee -a "$OUT/env.txt"

# 3. kernel tests on the GPU (the interpreter tests skip themselves where CUDA exists), then the runtime's
# (the compile case is skipped here: the benchmark compiles the full-size model and checks it). Tests and the demo
# model check correctness, not speed: one fixed launch config per kernel (BITNET158_AUTOTUNE=0), since compiling
# every autotune config of every kernel variant outlasted the tests' budgets on 2026-11-26
export BITNET158_AUTOTUNE=0
if [ "$MODE" = quick ]; then
  # in order of importance, each under its own timeout (the first call of each kernel variant compiles it)
  quick="decode_attention_bf16 or search_tiles or variants_follow or graph_decoder_matches_eager"
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
    -k "$quick or gpu_sample_in_a_graph or argmax_ties" \
    --deselect "tests/test_kernels.py::test_gpu_graph_decoder_matches_eager[True]" \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
  echo "pytest -m gpu -k '...' exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
else
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py \
    --deselect "tests/test_kernels.py::test_gpu_graph_decoder_matches_eager[True]" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -n 25
  echo "pytest -m gpu tests/test_kernels.py exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
fi
if [ "$MODE" != quick ] && [ -f tests/test_runtime_gpu.py ]; then
  timeout 45 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_runtime_gpu.py 2>&1 | tee -a "$OUT/pytest_gpu.log" | tail -n 10
  echo "pytest -m gpu tests/test_runtime_gpu.py exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
fi

# 4. the demo model: correctness with real logit margins, and every variant's greedy tokens against the default's
python3 -c "import sys; from bitnet158.converter.cli import main; sys.argv[1:] = ['hf-to-packed', 'examples/tiny-bitnet', \
  '-o', '/tmp/tiny.bin', '--force']; main()" > "$OUT/convert_demo.log" 2>&1 || echo "demo conversion failed" | tee -a "$OUT/env.txt"
# the user's first run: bitnet-run's default with its step search on (the tests above run without it) and no
# tile cache; a crash there once hid behind BITNET158_AUTOTUNE=0
rm -rf /tmp/cache_first  # empty also on a warm machine
XDG_CACHE_HOME=/tmp/cache_first timeout 120 env -u BITNET158_AUTOTUNE python3 -c "import sys; from bitnet158.runtime.cli import main; \
  sys.argv[1:] = ['/tmp/tiny.bin', '--prompt', 'Blessed are the', '-n', '24']; main()" > "$OUT/first_run.log" 2>&1
echo "first run of bitnet-run (step search on, empty cache) exit: $?" | tee -a "$OUT/env.txt"
tail -n 3 "$OUT/first_run.log"
# the fast path on CUDA (bf16, int8 tensor-core prefill) against transformers' BitNetForCausalLM (fp32) on the demo
# model's held-out text: a report, no thresholds (on the CPU, fp32 on both sides: KL 1.6e-4, top-1 99.6 %)
timeout 90 python3 -c "import sys; from bitnet158.compare.cli import main; sys.argv[1:] = ['/tmp/tiny.bin', \
  'examples/tiny-bitnet', '--engine-b', 'transformers', '--device', 'cuda', '--text', 'examples/heldout.txt']; main()" \
  > "$OUT/compare_demo.log" 2>&1
echo "bitnet-compare against transformers on CUDA exit: $?" | tee -a "$OUT/env.txt"
grep -E "KL|top-1|perplexity|diverge" "$OUT/compare_demo.log"
if [ "$MODE" = quick ]; then
  timeout -k 5 50 python3 benchmarks/bench_gpu.py --file /tmp/tiny.bin --no-micro --prompt-len 64 --tokens 64 --runs 1 \
    --variants torch/plain,default,default/pdl-early,default/pdl-early-packs,default/prefetch,folded/packed/pdl/argmax,default/int8 --no-eager --json "$OUT/bench_demo.json" \
    > "$OUT/bench_demo.log" 2>&1
else
  timeout -k 10 90 python3 benchmarks/bench_gpu.py --file /tmp/tiny.bin --no-micro --prompt-len 64 --tokens 128 --runs 1 \
    --slow-runs 1 --slow-tokens 16 --json "$OUT/bench_demo.json" > "$OUT/bench_demo.log" 2>&1
fi
echo "demo bench exit: $?" | tee -a "$OUT/bench_demo.log"
grep -E "^check:|CORRECTNESS|FAILED" "$OUT/bench_demo.log"

# 5. the benchmark, autotuned; its table comes last in the output
unset BITNET158_AUTOTUNE
if [ "$MODE" = quick ]; then
  timeout -k 5 200 python3 benchmarks/bench_gpu.py --variants default,default/pdl-early,default/pdl-early-packs,default,default/pdl-early,default/pdl-early-packs,default/int8 \
    --no-micro --no-eager --profile --budget-s 175 --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
else
  timeout -k 10 330 python3 benchmarks/bench_gpu.py --hf --compile --budget-s 240 --profile --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log"
fi
echo "bench exit: ${PIPESTATUS[0]}"
