#!/usr/bin/env python3
"""The floor a chain of kernels puts under a CUDA-graph decode step, whatever the kernels do.

    python benchmarks/launch_floor.py          # also a stage of bench_gpu.py

``n`` dependent launches of a kernel whose programs each read one value and write it back, replayed from one
CUDA graph, with and without programmatic dependent launch (sm_90+), for a 1-program grid and a GEMV-sized one
(528 programs, 4 a multiprocessor of an H100). Prints µs per launch: a decode step of L launches cannot run faster
than L times that, so this is the baseline the launch count of runtime/fast.py's step is judged against. "PDL early":
each kernel lets the next one launch before its wait (FastModel(pdl="early")), not after it; "PDL early every
other": every other kernel does (FastModel(pdl="early-packs"), where a pack and a GEMV alternate). "+ arrival":
the same kernel with every program arriving on an atomic counter and the last one reading the others' writes
(the mechanism of FastModel(gemv="folded")), so the difference is the fixed cost of a folded tail.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

# the runtime kernels' PDL entry and rule (sm_90+, a triton with gdc_*) and their counter arrival
from bitnet158.runtime.kernels import _last_arrival, _pdl, _pdl_enter


@triton.jit
def _chain_kernel(x_ptr, cnt_ptr, PDL: tl.constexpr, ARRIVE: tl.constexpr):
    # with PDL: wait for the previous kernel, then let the next one launch (as kernels.py's kernels do; PDL 2: the
    # other way round). ARRIVE:
    # every program then arrives on a counter and the last reads what the others wrote (kernels._last_arrival, the
    # folded kernels' mechanism), so the difference is what a folded tail costs beyond its own work
    _pdl_enter(PDL)
    i = tl.program_id(0)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)
    if ARRIVE:
        n = tl.num_programs(0)
        if _last_arrival(cnt_ptr, n):
            tl.store(x_ptr + n, tl.load(x_ptr + n - 1, cache_modifier=".cg"))


def launch_floor(timer, out: dict | None = None, n: int = 300) -> dict:
    """µs per dependent launch in a graph: {'1 programs': …, '1 programs + PDL': …, '1 programs + PDL early': …,
    '528 programs': …, …}.
    ``timer(fns)``: seconds per call of the calls in ``fns`` replayed from one CUDA graph (bench_gpu.graph_time)."""

    out = {} if out is None else out
    x = torch.zeros(529, device="cuda")
    cnt = torch.zeros(1, dtype=torch.int32, device="cuda")
    for grid in (1, 528):
        for pdl in (False, True, "early", "early-packs"):
            # kernel i's flags: with "early-packs" the even ones are the light kernels (the packs)
            flags = [_pdl(x, pdl, light=i % 2 == 0) for i in range(n)]
            if pdl and not flags[0]["PDL"]:
                continue
            for arrive in (False, True):
                t = timer([lambda grid=grid, f=f, arrive=arrive: _chain_kernel[(grid,)](x, cnt, ARRIVE=arrive, **f)
                           for f in flags])  # fmt: skip
                label = {False: "", True: " + PDL", "early": " + PDL early", "early-packs": " + PDL early every other"}
                label = label[pdl]
                out[f"{grid} programs{label}{' + arrival' if arrive else ''}"] = t * 1e6
    print("launch floor in a CUDA graph (µs per dependent launch): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("launch_floor: needs a CUDA device")
    from bench_gpu import graph_time  # this folder's benchmark script: the same graph timing as its microbenchmark

    print(torch.cuda.get_device_name())
    launch_floor(graph_time)
