"""CPU decode with the head stored f16 against the same values stored f32, alternating in one process.

    python benchmarks/cpu_head_dtype.py MODEL.bin [--rounds 4] [--tokens 32]

Why: Microsoft's I2_S GGUF stores the tied embedding (the head) as F16, which is not exact in bf16. Before the
loader kept 16-bit embeddings on the compiled CPU path, such a file ran its head over an fp32 upcast (twice the
bytes). This loads MODEL (any 16-bit-embedding file, e.g. `bitnet-convert random 2b4t`), rounds the embedding to
f16, and times greedy decode with it stored as f16 (what the loader now keeps) and as fp32 (what it made before),
round by round. The first round warms up (the head compiles once per dtype) and is not counted.
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    from bitnet158.runtime import load
    from bitnet158.runtime.generate import GenerationStats

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    model = load(args.model, device="cpu")
    if model.fast is None or model.fast.backend != "cpu":
        raise SystemExit("the compiled CPU path did not load (too small a model, or no compiler)")
    f16 = model.net.embed.half()  # [V, D]
    stored = {"f16": f16, "f32 upcast": f16.float()}
    prompt = list(range(1, 9))
    rates: dict[str, list[float]] = {k: [] for k in stored}
    for r in range(args.rounds):
        for name, e in stored.items():
            # the tied head is the embedding tensor itself; untied, only the head's bytes matter to decode
            model.net.embed = e
            model.net.head = e
            stats = GenerationStats()
            for _ in model.generate_ids(prompt, args.tokens, stop_ids=(), stats=stats):
                pass
            if r:
                rates[name].append(stats.decode_tok_s)
    print(f"| head stored | MiB | decode tok/s, median of {args.rounds - 1} (range) |")
    print("|---|---|---|")
    for name, e in stored.items():
        v = rates[name]
        mib = e.numel() * e.element_size() / 2**20
        print(f"| {name} | {mib:,.0f} | {statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f}) |")


if __name__ == "__main__":
    main()
