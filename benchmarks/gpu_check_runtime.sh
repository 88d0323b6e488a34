#!/usr/bin/env bash
# One-shot CUDA check of the runtime's reference path on a lent GPU machine (issue 3; the fast path's check is
# benchmarks/device_check.sh): environment, GPU tests, benchmark of a random 1bitLLM-large-shaped packed file
# (the reference path, packed and cache-unpacked, and the plain network on triton BitLinears). Results go to $OUT
# (or ./out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
python3 -c "import bitnet158.runtime, bitnet158.formats.packed as p; print(bitnet158.runtime.__file__, p.__file__)" || {
  # not installed here: expose the package folders as the bitnet158 namespace package
  mkdir -p /tmp/ns/bitnet158
  for d in runtime formats converter compare; do ln -sfn "$PWD/$d" /tmp/ns/bitnet158/$d; done
  export PYTHONPATH=/tmp/ns
  python3 -c "import bitnet158.runtime; print(bitnet158.runtime.__file__)"
}
python3 -c "import transformers, tokenizers, jinja2, click, tqdm, safetensors; print('transformers', transformers.__version__)"
TORCHDYNAMO_DISABLE=1 BITNET158_AUTOTUNE=0 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_runtime_gpu.py 2>&1 | tail -25
python3 -m bitnet158.converter.cli random 1bitllm-large -o /tmp/large.bin --force --no-progress
for extra in "--reference" "--reference --cache-unpacked" "--backend triton"; do
  timeout 120 python3 benchmarks/bench_runtime.py /tmp/large.bin --device cuda --runs 5 --decode-tokens 64 $extra
done
timeout 60 python3 -m bitnet158.runtime.cli /tmp/large.bin --prompt "Hello" -n 32 --device cuda 2>&1 | tail -8
