#!/usr/bin/env python3
"""The floor a chain of kernels puts under a CUDA-graph decode step, whatever the kernels do.

    python benchmarks/launch_floor.py          # also a stage of bench_gpu.py

``n`` dependent launches of a kernel whose programs each read one value and write it back, replayed from one
CUDA graph, with and without programmatic dependent launch (sm_90+), for a 1-program grid and a GEMV-sized one
(528 programs, 4 a multiprocessor of an H100). Prints µs per launch: a decode step of L launches cannot run faster
than L times that, so this is the baseline the launch count of runtime/fast.py's step is judged against.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch, as runtime/kernels.py imports it
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _chain_kernel(x_ptr, PDL: tl.constexpr):
    # with PDL: wait for the previous kernel, then let the next one launch (as kernels.py's kernels do)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    i = tl.program_id(0)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)


def launch_floor(timer, out: dict | None = None, n: int = 300) -> dict:
    """µs per dependent launch in a graph: {'1 programs': …, '1 programs + PDL': …, '528 programs': …, …}.
    ``timer(fns)``: seconds per call of the calls in ``fns`` replayed from one CUDA graph (bench_gpu.graph_time)."""
    from bitnet158.runtime.kernels import _use_pdl  # the same rule as the runtime's kernels: sm_90+, a triton with gdc_*

    out = {} if out is None else out
    x = torch.zeros(528, device="cuda")
    for grid in (1, 528):
        for pdl in (False, True):
            use = _use_pdl(x, pdl)
            if pdl and not use:
                continue
            t = timer([lambda grid=grid, use=use: _chain_kernel[(grid,)](x, PDL=use, launch_pdl=use) for _ in range(n)])
            out[f"{grid} programs{' + PDL' if pdl else ''}"] = t * 1e6
    print("launch floor in a CUDA graph (µs per dependent launch): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("launch_floor: needs a CUDA device")
    from bench_gpu import graph_time  # this folder's benchmark script: the same graph timing as its microbenchmark

    print(torch.cuda.get_device_name())
    launch_floor(graph_time)
