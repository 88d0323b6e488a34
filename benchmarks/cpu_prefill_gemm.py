"""CPU prefill GEMM: the reference's four 2-bit-plane int8 matmuls against cpu.bitlinear_rows' one, per layer.

    python benchmarks/cpu_prefill_gemm.py [--rows 1,16,32,64,128,256,512] [--shape 2b4t]

For each row count M, times (best of 5 after a warm-up) one layer's four BitLinear products at the shape's fused
widths (q/k/v, o, gate/up, down) through ``bitlinear.reference_bitlinear`` (int_dot_packed: the planes) and
``cpu.bitlinear_rows``, checks that the outputs are equal bit for bit, and prints one Markdown row per M. The
crossover sets ``cpu.PREFILL_ROWS``.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {  # (N, K) of q/k/v fused, o, gate/up fused, down
    "2b4t": [(2560 + 2 * 640, 2560), (2560, 2560), (2 * 6912, 2560), (2560, 6912)],
    "1bitllm-large": [(3 * 1536, 1536), (1536, 1536), (2 * 4096, 1536), (1536, 4096)],
}


def best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    from bitnet158.formats.ternary import pack_t2
    from bitnet158.runtime.bitlinear import reference_bitlinear
    from bitnet158.runtime.cpu import bitlinear_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,16,32,64,128,256,512")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="2b4t")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    mats = []
    for n, k in SHAPES[args.shape]:
        t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        mats.append((pack_t2(t), torch.rand(n, generator=gen) + 0.5, k))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {args.shape}")
    print("| rows | planes (reference) ms/layer | one matmul (bitlinear_rows) ms/layer | ratio |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for m in map(int, args.rows.split(",")):
            planes = rows = 0.0
            for packed, scale, k in mats:
                x = torch.randn(m, k, generator=gen)
                if not torch.equal(reference_bitlinear(x, packed, scale, k), bitlinear_rows(x, packed, scale, k)):
                    raise SystemExit(f"bitlinear_rows differs from the reference at {m} rows, K = {k}")
                planes += best(lambda: reference_bitlinear(x, packed, scale, k))
                rows += best(lambda: bitlinear_rows(x, packed, scale, k))
            print(f"| {m} | {planes * 1e3:.1f} | {rows * 1e3:.1f} | {planes / rows:.2f}× |")


if __name__ == "__main__":
    main()
