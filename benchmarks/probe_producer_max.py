"""Can the kernel that produces a GEMV's input know that input's quantization scale? (CPU, a few seconds)

BitLinear quantizes y = γ · (h · rstd) with s = 127 / max|y|, where RMSNorm rounds h · rstd and then γ · (…) to
bf16 (runtime/model.py's RMSNorm, used here; the fast path's ``kernels._norm_apply`` rounds the same way). A
producer, before the row is complete, can track max|γ · h| but not rstd. This counts the random rows in which the element with the largest |γ · h| is not
the one with the largest |y|: there, a scale taken from the producer's max would differ from BitLinear's, and
with it every int8 value of the row (benchmarks/RESULTS.md, "statistics from the producing kernels").
"""

import argparse

import torch

from bitnet158.runtime.model import RMSNorm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--width", type=int, default=2560, help="values a row (2B-4T: 2,560 hidden, 6,912 MLP)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    h = (torch.randn(args.rows, args.width) * 3).bfloat16()  # a residual stream's scale
    g = (1 + 0.3 * torch.randn(args.width)).bfloat16()  # norm weights around 1
    y = RMSNorm(g, 1e-5)(h).float()
    at_producer_max = y.gather(1, (g.float() * h.float()).abs().argmax(dim=1, keepdim=True)).abs().squeeze(1)
    wrong = int((at_producer_max != y.abs().amax(dim=1)).sum())
    print(f"{wrong} of {args.rows} rows of {args.width}: the largest |γ·h| is not the largest |y| "
          f"({wrong / args.rows:.2%}; s = 127 / max|y| would differ there)")


if __name__ == "__main__":
    main()
