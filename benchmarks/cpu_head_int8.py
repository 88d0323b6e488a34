"""CPU decode with the int8 head (``bitnet-run --head int8``) against the model's 16-bit head, alternating in one
process.

    python benchmarks/cpu_head_int8.py MODEL.bin [--rounds 4] [--tokens 32]

Why: at 2B-4T the head is a [128256, 2560] matrix, 657 MB in bf16, the largest read of a decode step; on the
compiled CPU path it multiplies in fp32 after an upcast. The int8 head (runtime/bitlinear.py's quantize_head and
int8_head_logits) reads half the bytes through one oneDNN int8 GEMV. This loads MODEL with the int8 head, then times
greedy decode with each head in turn (``FastModel.set_head``), round by round, from the same prompt. The first round
warms up (the bf16 head compiles) and is not counted. Then it times each head's own call on one hidden state
(median of 30). It also prints how many greedy ids the two heads share (a
random model's logits are nearly flat, so expect them to part early there; benchmarks/head_quality.py measures
the int8 head's quality on a trained model).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    from bitnet158.runtime import cpu, load
    from bitnet158.runtime.bitlinear import int8_head_logits
    from bitnet158.runtime.generate import GenerationStats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = load(args.model, device="cpu", head="int8")
    load_s = time.perf_counter() - t0
    fast = model.fast
    prompt = list(range(1, 9))
    rates: dict[str, list[float]] = {"bf16": [], "int8": []}
    ids: dict[str, list[int]] = {}
    for r in range(args.rounds):
        for head in rates:
            fast.set_head(head)
            stats = GenerationStats()
            ids[head] = list(model.generate_ids(prompt, args.tokens, stop_ids=(), stats=stats))
            if r:
                rates[head].append(stats.decode_tok_s)
    net = model.net
    x = torch.randn(net.head.shape[1])  # [D], a last layer's output
    with torch.inference_mode():
        head_ms = {
            "bf16": median_ms(lambda: cpu.kernels().head(x, net.norm.weight, net.norm.eps, net.head)),
            "int8": median_ms(lambda: int8_head_logits(net.norm(x)[None], fast.head_q, fast.head_scale)),
        }
    same = next((i for i, (a, b) in enumerate(zip(ids["bf16"], ids["int8"])) if a != b), args.tokens)
    head_mib = {
        "bf16": model.net.head.numel() * model.net.head.element_size() / 2**20,
        "int8": (fast.head_q.numel() + 4 * fast.head_scale.numel()) / 2**20,
    }
    print(f"load with the int8 head: {load_s:.2f} s; resident weights {model.resident_weight_bytes() / 2**20:,.0f} MiB;"
          f" greedy ids equal for the first {same} of {args.tokens}")
    print(f"| head | head MiB | head call ms | decode tok/s, median of {args.rounds - 1} (range) |")
    print("|---|---|---|---|")
    for head, v in rates.items():
        row = f"| {head} | {head_mib[head]:,.0f} | {head_ms[head]:.1f} | {statistics.median(v):.2f}"
        print(f"{row} ({min(v):.2f}–{max(v):.2f}) |")


if __name__ == "__main__":
    main()
