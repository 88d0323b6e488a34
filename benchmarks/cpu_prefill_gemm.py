"""CPU prompts: the reference's four 2-bit-plane int8 matmuls against cpu.bitlinear_rows' one, in a whole model.

    python benchmarks/cpu_prefill_gemm.py MODEL.bin [--rows 16,32,48,64,128,512] [--rounds 3]

Loads MODEL on the compiled CPU path and, for each prompt length, runs the same random prompt through
``FastModel.logits`` with ``cpu.PREFILL_ROWS`` forced above it (every projection on the planes) and at 1 (every
projection one matmul), alternating, ``--rounds`` times each after a warm-up. Prints prompt tok/s (min–max) per
mode as Markdown rows and checks that both modes give bit-identical logits (of the last position). The crossover sets
``cpu.PREFILL_ROWS``.

Measured in the model, not on one layer in a loop: there a layer's few MB of weights stay in the caches, which
favours the planes (each re-reads the packed bytes), while a prompt streams every layer's weights from memory.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from bitnet158.runtime import cpu, load

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rows", default="16,32,48,64,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = load(args.model, device="cpu")
    if model.fast is None or model.fast.backend != "cpu":
        raise SystemExit("the compiled CPU path did not load (too small a model, or no compiler)")
    rows = [int(r) for r in args.rows.split(",")]
    model.net.setup_cache(1, max(rows))
    gen = torch.Generator().manual_seed(0)
    modes = {"planes": 1 << 30, "one matmul": 1}
    print(f"{args.model}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| prompt tokens | planes tok/s | one matmul tok/s |")
    print("|---|---|---|")
    with torch.inference_mode():
        for m in rows:
            ids = torch.randint(0, model.config.vocab_size, (1, m), generator=gen)
            rates: dict[str, list[float]] = {k: [] for k in modes}
            logits = {}
            for r in range(args.rounds + 1):
                for name, threshold in modes.items():
                    cpu.PREFILL_ROWS = threshold
                    t = time.perf_counter()
                    logits[name] = model.fast.logits(ids, 0)  # the last position's, as a prompt needs
                    if r:  # round 0 warms up
                        rates[name].append(m / (time.perf_counter() - t))
            if not torch.equal(logits["planes"], logits["one matmul"]):
                raise SystemExit(f"the two modes' logits differ at {m} tokens")
            cells = [f"{min(v):.1f}–{max(v):.1f}" for v in rates.values()]
            print(f"| {m} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
