"""CPU decode, ours against llama.cpp, interleaved in one process on one machine (issue 3's target).

    pip install llama-cpp-python     # builds llama.cpp from source (~7 min on 2 cores)
    python benchmarks/bench_cpu_decode.py --dir /tmp/bn-large [--threads 1,2] [--rounds 3] [--tokens 64]

The model is bench_llamacpp.py's random 1bitLLM-large-shaped packed file (made in DIR if missing) and its TQ2_0
export by our `packed-to-gguf`. For each thread count, each round times, one after the other:
- llama.cpp TQ2_0: greedy decode of N tokens after an 8-token prompt (llama_cpp.Llama, n_threads = T);
- ours, default load (the compiled CPU path of runtime/cpu.py for this size): ``generate_ids`` of N tokens.
Rounds interleave the engines so that drift on a shared machine hits both. (Our reference path is measured by
bench_runtime.py --reference in a process of its own: next to the compiled kernels' OpenMP threads its 2-thread
figures vary 3× from run to run.) Reports best and median
tok/s per engine and ours/llama.cpp, as JSON lines and Markdown rows for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _bench_llamacpp():
    spec = importlib.util.spec_from_file_location("bench_llamacpp", HERE / "bench_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ours_decode(model, prompt: list[int], n: int) -> float:
    from bitnet158.runtime.generate import GenerationStats

    stats = GenerationStats()
    for _ in model.generate_ids(prompt, n, stop_ids=(), stats=stats):
        pass
    return stats.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per timed run (llama.cpp and ours)")
    args = ap.parse_args()

    import llama_cpp

    from bitnet158.converter.gguf_convert import packed_to_gguf
    from bitnet158.runtime import load

    bl = _bench_llamacpp()
    args.dir.mkdir(parents=True, exist_ok=True)
    packed = args.dir / f"model-{bl.LAYERS}l.bin"
    if not packed.exists():
        bl.make_random_1bitllm_large(packed)
    gguf = packed.with_name(f"{packed.stem}-tq2_0.gguf")
    if not gguf.exists():
        packed_to_gguf(packed, gguf, qtype="tq2_0", force=True)
    prompt = [1] + list(range(100, 107))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        fast = load(str(packed), device="cpu")
        ours_decode(fast, prompt, args.tokens)  # compiles (or loads torch's cache) at the timed cache size
        warm_s = time.perf_counter() - t0
        rates = {"llama.cpp TQ2_0": [], f"ours ({fast.backend})": []}
        for _ in range(args.rounds):
            r = bl.llama_decode_speed(llama_cpp, gguf, prompt, args.tokens, threads, 1)
            rates["llama.cpp TQ2_0"].append(r["decode_tok_s"])
            rates[f"ours ({fast.backend})"].append(ours_decode(fast, prompt, args.tokens))
        base = statistics.median(rates["llama.cpp TQ2_0"])
        for engine, r in rates.items():
            med = statistics.median(r)
            rec = {"engine": engine, "threads": threads, "best_tok_s": round(max(r), 2), "median_tok_s": round(med, 2),
                   "vs_llama_cpp_median": round(med / base, 2), "runs": [round(x, 2) for x in r],
                   "load_avg": os.getloadavg(), "machine": machine}  # fmt: skip
            if engine.startswith("ours (cpu"):
                rec["load_and_first_compile_s"] = round(warm_s, 1)
            print(json.dumps(rec), flush=True)
            print(f"| {threads} | {engine} | {rec['median_tok_s']:.1f} (best {rec['best_tok_s']:.1f}) |"
                  f" {rec['vs_llama_cpp_median']:.2f}× |", flush=True)
        del fast


if __name__ == "__main__":
    main()
