#!/usr/bin/env bash
# One-shot CUDA check of the runtime on a lent GPU machine: environment, GPU tests, benchmark of a random
# 1bitLLM-large-shaped packed file (reference backend, packed and cache-unpacked). Results go to $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(0))"
python -c "import bitnet158.runtime, bitnet158.formats.packed as p; print(bitnet158.runtime.__file__, p.__file__)" || {
  # not installed here: expose the package folders as the bitnet158 namespace package
  mkdir -p /tmp/ns/bitnet158
  for d in runtime formats converter compare; do ln -sfn "$PWD/$d" /tmp/ns/bitnet158/$d; done
  export PYTHONPATH=/tmp/ns
  python -c "import bitnet158.runtime; print(bitnet158.runtime.__file__)"
}
python -c "import transformers, tokenizers, jinja2, click, tqdm, safetensors; print('transformers', transformers.__version__)"
TORCHDYNAMO_DISABLE=1 timeout 240 python -m pytest -q -p no:cacheprovider tests/test_runtime_gpu.py 2>&1 | tail -25
python -m bitnet158.converter.cli random 1bitllm-large -o /tmp/large.bin --force --no-progress
for extra in "" "--cache-unpacked" "--backend triton"; do
  timeout 120 python benchmarks/bench_runtime.py /tmp/large.bin --device cuda --runs 5 --decode-tokens 64 $extra
done
timeout 60 python -m bitnet158.runtime.cli /tmp/large.bin --prompt "Hello" -n 32 --device cuda 2>&1 | tail -8
