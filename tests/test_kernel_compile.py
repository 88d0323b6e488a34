"""The Triton kernels compile for an NVIDIA GPU, checked on a machine without one.

Triton's interpreter (tests/test_kernels.py) runs the kernels' Python but not the compiler, so a kernel can pass
there and still fail to compile for the GPU. benchmarks/kernel_resources.py compiles every kernel for sm_90
(H100/H200) with the shapes of the 2B-4T model; this test runs its quick mode in a subprocess (the interpreter
must be off there) and asserts that everything compiled, that the atomics of the kernels that arrive on a
counter keep their memory ordering in the machine code, that the L2 prefetches are there, that the packed GEMV's
loop waits on no barrier and nothing after it on memory, that the prefill matmul loads no single bytes, and that
no bf16 product is contracted into a fused multiply-add. Registers and instruction counts are reported by the script, not asserted:
speed belongs to the benchmarks. Also the switch that replaces the GPU autotuner by fixed configs, which is read at
import, so it is checked in subprocesses too, and the kernels' float literals, which older Tritons type as fp64 when
fp32 cannot hold them normally.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "cuobjdump").exists(), reason="this triton build has no NVIDIA toolchain")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--quick", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode in (0, 1), run.stderr[-2000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    failed = {r["kernel"]: r["error"] for r in rows if "error" in r}
    assert not failed, failed
    kinds = {r["kernel"].split()[0] for r in rows}
    assert kinds >= {"gemv_w2a8", "gemv_packed", "pack_act", "head_int8", "matmul_w2a8", "decode_attention", "attention_combine",
                     "argmax", "sample", "advance"}, kinds  # fmt: skip
    assert any(r["kernel"].endswith("+pdl") for r in rows)  # programmatic dependent launch compiles too
    # and in the machine code each kernel with it waits, then lets the next launch (kernels._pdl_enter), or with
    # the early trigger (FastModel(pdl="early")), one variant of every such kernel, the reverse; without it, neither
    order = {r["kernel"]: r["pdl_order"] for r in rows}
    early = {k for k in order if k.endswith("+pdl early")}
    assert {k.split()[0] for k in early} == {k.split()[0] for k in order if k.endswith("+pdl")}, early
    for k, got in order.items():
        want = ["launch_dependents", "wait"] if k in early else ["wait", "launch_dependents"] if k.endswith("+pdl") else []
        assert got == want, (k, got)
    # the folded kernels (FastModel(gemv="folded")), the argmax and the sampler arrive on counters: each atomic
    # keeps the barrier / release / acquire that lets the last program read the others' output (_last_arrival)
    counted = [r for r in rows if "packs" in r["kernel"] or "folded" in r["kernel"] or r["kernel"].startswith(("argmax", "sample"))]
    assert len(counted) >= 9 and all(r["sync_ops"] and set(r["sync_ops"]) == {"acq_rel"} for r in counted), counted
    assert not any(r["sync_ops"] for r in rows if r not in counted)
    # the packed GEMV's dot loop (kernels._packed_dot) waits on no barrier: its activation words are loaded in the
    # weights' layout, not broadcast through shared memory, which took 8 barriers a tile and kept the four fields'
    # L2 round trips one after another. And nothing waits on memory after it: the scale is read before the PDL
    # wait, the input's scale, Σ q and the residual with the first words (the folded GEMVs' tails read their rows)
    packed = [r for r in rows if r["kernel"].startswith("gemv_packed")]
    for r in packed:
        main = max(r["loops"], key=lambda lp: lp["size"])
        assert main["barriers"] == 0 and (main["loads_after"] == 0 or "packs" in r["kernel"]), r
    # the prefill matmul loads its weight bytes as 16-byte rows of the tile (staged by the pipeline), not one byte a
    # weight (64 byte loads a thread a tile, outside the pipeline, and 80-824 B of spills under Triton 3.6)
    mm = [r for r in rows if r["kernel"].startswith("matmul_w2a8")]
    assert mm and all(r["byte_loads"] == 0 and r["stack_bytes"] == 0 for r in mm), mm
    # no bf16 fused multiply-add anywhere: the kernels that round like torch's bf16 ops (the rope of decode_attention)
    # lose a rounding to one; kernels._opaque keeps their products apart
    assert not {r["kernel"]: r["bf16_fma"] for r in rows if r["bf16_fma"]}
    # real machine code: over 100 instructions each, but the state update (kernels.advance: 4 stores, about 40)
    assert all(r["registers"] > 0 and r["sass_instructions"] > (10 if r["kernel"].startswith("advance") else 100) for r in rows)
    # FastModel(prefetch="after" / "before"): the attention's L2 prefetches are in its machine code (CCTL.E.PF2),
    # and only there
    prefetching = {r["kernel"] for r in rows if r["l2_prefetches"]}
    want = {f"decode_attention split{f} + L2 prefetch{e}{p}" for f, e in (("", ""), ("", " (early)"), (" + combine + pack (folded)", ""))
            for p in ("", " +pdl")}  # fmt: skip
    assert prefetching == want, prefetching


def test_autotune_can_be_switched_off():
    # BITNET158_AUTOTUNE=0 (benchmarks/device_check.sh's test stages): one fixed config per kernel on a GPU, read
    # at import; the interpreter always runs its own small config
    code = "import bitnet158.runtime.kernels as k; print(k._TUNE, k.FIXED_GEMV, k._FIXED_MM == k._MM_CONFIGS[0])"
    base = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BITNET158_AUTOTUNE")}
    for env, want in [({}, "True (16, 128, 4) True"), ({"BITNET158_AUTOTUNE": "0"}, "False (16, 128, 4) True"),
                      ({"BITNET158_AUTOTUNE": "0", "TRITON_INTERPRET": "1"}, "False (16, 16, 1) False")]:  # fmt: skip
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**base, **env}, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == want, env


def test_kernel_float_literals_are_fp32():
    # Triton types a Python float literal fp32 only when fp32 holds it as a normal number (|v| in [2^-126, fp32 max]
    # or 0); else fp64, which then spreads through the arithmetic. Triton 3.6 (the device image of 2026-11-27) then
    # refused libdevice.div_rn(fp32, fp64) in kernels.sample's top-p path, written with 1e-38, while the Triton of
    # these tests compiled it. So every float literal in a @triton.jit function of runtime/kernels.py is checked here
    src = (ROOT / "runtime" / "kernels.py").read_text(encoding="utf-8")
    jitted = [f for f in ast.walk(ast.parse(src)) if isinstance(f, ast.FunctionDef)
              and any("triton.jit" in ast.unparse(d) for d in f.decorator_list)]  # fmt: skip
    assert len(jitted) > 40
    bad = [(f.name, c.value) for f in jitted for c in ast.walk(f) if isinstance(c, ast.Constant)
           and type(c.value) is float and c.value != 0 and not 2.0**-126 <= abs(c.value) <= 3.4028234663852886e38]  # fmt: skip
    assert not bad, bad
