#!/usr/bin/env python3
"""Compile every Triton kernel of runtime/kernels.py for an NVIDIA GPU on a machine without one, and report what
each launch configuration costs in registers, spills and SASS instructions.

    python benchmarks/kernel_resources.py                 # every kernel, every autotune config, sm_90 (H100/H200)
    python benchmarks/kernel_resources.py --quick --json   # one config per kernel variant (tests/test_kernel_compile.py)
    python benchmarks/kernel_resources.py --arch 80        # A100

Why: Triton's interpreter (the CPU tests) runs the kernels' Python, not the compiler, so a kernel can pass every
interpreter test and still fail to compile on the GPU, or compile into a kernel that spills registers. Triton
compiles for a given target without a device (its wheel carries ptxas and cuobjdump), which settles both before
a device session is spent on it. The scalar arguments are specialised as at run time for the 2B-4T shapes
(integers divisible by 16 marked so, pointers 16-byte aligned), so loads vectorise as they will on the GPU.
Nothing is run and nothing here is a timing.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_resources: unset TRITON_INTERPRET: the interpreter replaces the kernels this script compiles")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from bitnet158.runtime import kernels as K  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
D, I, V, NQ, NKV = 2560, 6912, 128256, 2560, 640  # the 2B-4T shape


def variants(quick: bool) -> list[tuple[str, object, dict, dict, dict]]:
    """(label, jit function, pointer / scalar arguments, constexprs, launch options) to compile."""
    bf = "*bf16"
    out = []
    gemv_cfgs = K._GEMV_CONFIGS[3:4] if quick else K._GEMV_CONFIGS
    # the plain GEMV (the first graph step's, and any decode-sized BitLinear on the triton backend): K = D and I
    for label, k in (("K=D", D), ("K=I", I)):
        for bn, bw, warps in gemv_cfgs:
            args = {"x_ptr": bf, "w_ptr": "*i32", "scale_ptr": "*fp32", "y_ptr": bf, "N": D, "K": k, "K16": k // 16,
                    "stride_xm": k, "stride_wn": k // 16, "stride_ym": D}  # fmt: skip
            const = dict(SCALE_PER_ROW=False, BLOCK_N=bn, BLOCK_W=bw, BLOCK_P=K.prologue_block(k), ON_GPU=True)
            out.append((f"gemv_w2a8 plain {label} {bn}x{bw} w{warps}", K._gemv_w2a8_kernel, args, const, {"num_warps": warps}))
    packed = {  # label → (N, K, HAS_RES, the folded tail's (P_K, P_ACT) or None): FastModel(gemv="packed" / "folded")
        "(qkv)": (3840, D, False, None),
        "+ residual (down)": (D, I, True, None),
        "+ residual, packs norm (o → gate|up)": (D, NQ, True, (D, False)),
        "packs relu2·up + norm (gate|up → down)": (2 * I, D, False, (I, True)),
        "+ residual, packs norm (down → next qkv)": (D, I, True, (D, False)),
    }
    for label, (n, k, res, tail) in packed.items():
        cfgs = gemv_cfgs + ([] if quick else K._PACKED_EXTRA + K._PACKED_WIDE)
        for bn, bw, warps in K.PACKED_GEMV_CONFIGS[-1:] if quick and tail else cfgs:
            p_k = tail[0] if tail else 16
            args = {"xq_ptr": "*i32", "s_ptr": "*fp32", "qs_ptr": "*i32", "w_ptr": "*i32", "scale_ptr": "*fp32",
                    "res_ptr": bf, "y_ptr": bf, "N": n, "K16": k // 16, "stride_xq": k // 4, "stride_wn": k // 16,
                    "stride_rm": n, "stride_ym": n, "cnt_ptr": "*i32", "p_nw_ptr": bf, "p_xq_ptr": "*i32",
                    "p_s_ptr": "*fp32", "p_qs_ptr": "*i32", "P_K": p_k, "P_K16": p_k // 16, "p_eps": 1e-5,
                    "p_stride_xq": p_k // 4}  # fmt: skip
            const = dict(HAS_RES=res, SCALE_PER_ROW=False, BLOCK_N=bn, BLOCK_W=bw, ON_GPU=True)
            if tail:
                const.update(PACK=True, P_ACT=tail[1], P_NORM=True, P_RELU2=tail[1],
                             P_BLOCK_C=K.pack_act_launch(p_k // 16, tail[1])[0])  # fmt: skip
            out.append((f"gemv_packed {label} {bn}x{bw} w{warps}", K._gemv_packed_kernel, args, const, {"num_warps": warps}))
    for label, (k, act, norm) in {"norm": (D, False, True), "relu2 + norm": (I, True, True)}.items():
        args = {"x_ptr": bf, "nw_ptr": bf, "xq_ptr": "*i32", "s_ptr": "*fp32", "qs_ptr": "*i32", "K": k,
                "K16": k // 16, "eps": 1e-5, "stride_xm": 2 * k if act else k, "stride_xq": k // 4}  # fmt: skip
        block_c, own = K.pack_act_launch(k // 16, act)
        const = dict(ACT=act, NORM=norm, RELU2=act, BLOCK_C=block_c, ON_GPU=True)
        for warps in sorted({own, *K.PACK_WARPS}):  # pack_act_launch's warps and every count the step search tries
            out.append((f"pack_act {label} w{warps}", K._pack_act_kernel, args, const, {"num_warps": warps}))
    for norm in (False, True):
        for bn, bw, warps in gemv_cfgs:
            args = {"x_ptr": bf, "nw_ptr": bf, "w_ptr": "*i32", "scale_ptr": "*fp32", "y_ptr": "*fp32", "N": V, "K": D,
                    "K4": D // 4, "eps": 1e-5, "stride_xm": D, "stride_wn": D // 4, "stride_ym": V}  # fmt: skip
            const = dict(NORM=norm, BLOCK_N=bn, BLOCK_W=bw, BLOCK_P=K.prologue_block(D), ON_GPU=True)
            label = f"head_int8{' + norm' if norm else ''} {bn}x{bw} w{warps}"
            out.append((label, K._gemv_w8a8_kernel, args, const, {"num_warps": warps}))
    for bm, bn, bk, warps, stages in K._MM_CONFIGS[: 1 if quick else None]:
        args = {"q_ptr": "*i8", "s_ptr": "*fp32", "w_ptr": "*u8", "scale_ptr": "*fp32", "y_ptr": bf, "M": 512, "N": D,
                "K": D, "KB": D // 4, "stride_qm": D, "stride_wn": D // 4, "stride_ym": D, "M_BUCKET": 1024}  # fmt: skip
        const = dict(SCALE_PER_ROW=False, INT8_DOT=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        out.append((f"matmul_w2a8 {bm}x{bn}x{bk} w{warps} s{stages}", K._mm_w2a8_kernel, args, const,
                    {"num_warps": warps, "num_stages": stages}))  # fmt: skip
    out.append(("quantize_act", K._quant_kernel, {"x_ptr": bf, "q_ptr": "*i8", "s_ptr": "*fp32", "K": D, "stride_xm": D,
                "stride_qm": D}, dict(BLOCK=4096, ON_GPU=True), {"num_warps": 4}))  # fmt: skip
    for res in (False, True):
        args = {"x_ptr": bf, "res_ptr": bf, "h_ptr": bf, "w_ptr": bf, "y_ptr": bf, "D": D, "eps": 1e-5,
                "stride_x": D, "stride_res": D, "stride_h": D, "stride_y": D}  # fmt: skip
        out.append((f"rmsnorm{' + residual' if res else ''}", K._rmsnorm_kernel, args,
                    dict(HAS_RES=res, BLOCK=4096), {"num_warps": 8}))  # fmt: skip
    args = {"gu_ptr": bf, "w_ptr": bf, "y_ptr": bf, "I": I, "eps": 1e-5, "stride_gu": 2 * I, "stride_y": I}
    out.append(("act_mul_norm", K._act_mul_norm_kernel, args, dict(RELU2=True, HAS_NORM=True, BLOCK=8192), {"num_warps": 8}))
    args = {"qkv_ptr": bf, "cos_ptr": bf, "sin_ptr": bf, "pos_ptr": "*i64", "k_ptr": bf, "v_ptr": bf, "y_ptr": bf,
            "pm_ptr": "*fp32", "pl_ptr": "*fp32", "pacc_ptr": "*fp32", "NQ": NQ, "NKV": NKV, "stride_kh": 4096 * 128,
            "stride_ks": 128, "scale": 128**-0.5, "CHUNK": 256, "S": 16, "cnt_ptr": "*i32", "p_nw_ptr": bf,
            "p_xq_ptr": "*i32", "p_s_ptr": "*fp32", "p_qs_ptr": "*i32", "P_K16": NQ // 16, "p_eps": 1e-5}  # fmt: skip
    # PIPE as decode_attention sets it: the one-kernel form loops over the whole cache; a split spans one key block
    # up to 1,024 slots, several (pipelined) above
    attn = (("", False, False, True), (" split", True, False, False), (" split, pipelined (> 1,024 slots)", True, False, True),
            (" split + combine + pack (folded)", True, True, False), (" split + L2 prefetch", True, False, False),
            (" split + L2 prefetch (early)", True, False, False),
            (" split + combine + pack (folded) + L2 prefetch", True, True, False))  # fmt: skip
    for label, split, fold, pipe in attn:
        const = dict(GROUP=4, DH=128, HALF=64, BLOCK_N=64, SPLIT=split, ON_GPU=True, PIPE=pipe)
        kargs = args
        if "prefetch" in label:  # FastModel(prefetch="after"): the o, gate|up, down and next q/k/v bytes
            sizes = (D * NQ // 4, 2 * I * D // 4, D * I // 4, (NQ + 2 * NKV) * D // 4)
            kargs = {**args, **{f"pf{j}": "*u8" for j in range(4)}, **{f"pf{j}_n": n for j, n in enumerate(sizes)}}
            const.update(N_PF=4, PF_EARLY="early" in label)
        if fold:
            const.update(FOLD=True, P_NORM=True, P_BLOCK_C=K.pack_act_launch(NQ // 16, False)[0], BLOCK_S=16, BLOCK_D=128)
        out.append((f"decode_attention{label}", K._decode_attention_kernel, kargs, const, {"num_warps": 4}))
    args = {"pm_ptr": "*fp32", "pl_ptr": "*fp32", "pacc_ptr": "*fp32", "y_ptr": bf, "S": 16}
    out.append(("attention_combine", K._attention_combine_kernel, args, dict(DH=128, BLOCK_S=16, BLOCK_D=128), {"num_warps": 4}))
    args = {"x_ptr": "*fp32", "N": V, "pv_ptr": "*fp32", "pi_ptr": "*i32", "cnt_ptr": "*i32", "out_ptr": "*i64"}
    out.append(("argmax", K._argmax_kernel, args, dict(BLOCK=4096, BLOCK_P=32), {"num_warps": 8}))
    # the sampled step's draw (kernels.sample): top-k 50 with top-p and min-p, and the largest k
    args = {"x_ptr": "*fp32", "N": V, "K": 50, "temp_ptr": "*fp32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32",
            "rng_ptr": "*i64", "pk_ptr": "*i64", "po_ptr": "*i32", "cnt_ptr": "*i32", "out_ptr": "*i64"}  # fmt: skip
    for label, k, kp in (("k=50", 50, 64), (f"k={K.SAMPLE_MAX_K}", K.SAMPLE_MAX_K, K.SAMPLE_MAX_K)):
        const = dict(KP=kp, BLOCK=4096, BLOCK_P=32, USE_TOP_P=True, USE_MIN_P=True, ON_GPU=True)
        out.append((f"sample {label}", K._sample_kernel, {**args, "K": k}, const, {"num_warps": 8}))
    # the draw without a top-k (kernels.sample with k None): the top-p cut's levels, first and last, and the race
    blk = K.NUCLEUS_BLOCK
    n_prog = -(-V // blk)
    bp = 1 << (n_prog - 1).bit_length()
    bits = K.NUCLEUS_BITS
    args = {"x_ptr": "*fp32", "N": V, "temp_ptr": "*fp32", "top_p_ptr": "*fp32", "sf_ptr": "*fp32", "st_ptr": "*i64",
            "pmax_ptr": "*fp32", "pm_ptr": "*fp32", "pc_ptr": "*i32", "cnt_ptr": "*i32"}  # fmt: skip
    for level, top_p in ((0, True), (32 // bits - 1, True), (0, False)):
        const = dict(LEVEL=level, BITS=bits, TOP_P=top_p, BLOCK=blk, CH=K.nucleus_chunk(blk), BLOCK_P=bp, ON_GPU=True)
        label = f"sample nucleus level {level} of {32 // bits}" + ("" if top_p else ", max only")
        out.append((label, K._nucleus_level_kernel, args, const, {"num_warps": 8}))
    args = {"x_ptr": "*fp32", "N": V, "temp_ptr": "*fp32", "min_p_ptr": "*fp32", "rng_ptr": "*i64", "sf_ptr": "*fp32",
            "st_ptr": "*i64", "pc_ptr": "*i32", "pv_ptr": "*fp32", "pi_ptr": "*i64", "pn_ptr": "*i32", "cnt_ptr": "*i32",
            "out_ptr": "*i64"}  # fmt: skip
    const = dict(BITS=K.NUCLEUS_BITS, TOP_P=True, USE_MIN_P=True, BLOCK=blk, BLOCK_P=bp, ON_GPU=True)
    out.append(("sample nucleus race", K._nucleus_race_kernel, args, const, {"num_warps": 8}))
    args = {"nxt_ptr": "*i64", "out_ptr": "*i64", "n_ptr": "*i64", "tok_ptr": "*i64", "pos_ptr": "*i64", "S": 1024}
    out.append(("advance", K._advance_kernel, args, {}, {"num_warps": 1}))
    # the kernels that take programmatic dependent launch (FastModel(pdl=True)), once per variant with it on, and
    # once per kernel with its early trigger (FastModel(pdl="early"): the same code but for the order of the two)
    seen, early = set(), set()
    for label, fn, a, const, opts in list(out):
        variant = (fn, label.rsplit(" ", 2)[0] if "BLOCK_W" in const else label)
        if "PDL" in fn.arg_names and variant not in seen:
            seen.add(variant)
            out.append((f"{label} +pdl", fn, a, {**const, "PDL": 1}, {**opts, "launch_pdl": True}))
            if fn not in early:
                early.add(fn)
                out.append((f"{label} +pdl early", fn, a, {**const, "PDL": 2}, {**opts, "launch_pdl": True}))
    return out


def compile_one(fn, args: dict, const: dict, opts: dict, arch: int) -> dict:
    names = fn.arg_names
    # parameters with a default in the kernel's signature (PDL, the folded tails' options, the prefetch regions) take
    # it unless given: as constexprs, so an unused pointer is None
    defaults = {k: p.default for k, p in inspect.signature(fn.fn).parameters.items() if p.default is not p.empty and k not in args}
    const = {**defaults, **const}
    missing = set(names) - set(args) - set(const)
    if missing:
        raise ValueError(f"{fn.__name__}: no value for {sorted(missing)}")
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in const:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):  # a pointer: torch allocations are 256-byte aligned
            sig[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn, sig, const, attrs)
    t0 = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    row = {"compile_s": round(time.perf_counter() - t0, 2), "shared_bytes": ck.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(ck.asm["cubin"])
        usage = subprocess.run([str(BIN / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m:
        row.update(registers=int(m[1]), stack_bytes=int(m[2]), local_bytes=int(m[4]))
    # instructions only: nvdisasm also prints the cubin's data sections (.nv.info, constants) as `.byte` lines
    row["sass_instructions"] = sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+[A-Z@{]", line))
    row["l2_prefetches"] = sass.count("CCTL.E.PF2")  # kernels._l2_prefetch's instructions
    # fused multiply-adds in bf16: LLVM contracts a bf16-rounded product and the add after it into one fma.rn.bf16,
    # which drops the product's rounding, so a kernel that rounds like torch's bf16 ops (rope, norms) must have none
    row["bf16_fma"] = len(re.findall(r"\bfma\.rn(?:\.[a-z]+)*\.bf16(?:x2)?\b", ck.asm["ptx"]))
    row["loops"] = loops(sass)
    row["byte_loads"] = len(re.findall(r"\bLDG\.E\.[US]8\b", sass))  # single-byte global loads
    row["sync_ops"] = sync_ops(sass)
    # the grid dependency controls in the machine code's order (kernels._pdl_enter; griddepcontrol.wait is ACQBULK,
    # .launch_dependents PREEXIT): PDL 1 waits, then lets the next kernel launch; PDL 2 (pdl="early") the reverse
    row["pdl_order"] = [{"ACQBULK": "wait", "PREEXIT": "launch_dependents"}[m] for m in re.findall(r"\b(ACQBULK|PREEXIT)\b", sass)]
    return row


def sync_ops(sass: str) -> list[str]:
    """The ordering of each synchronising memory operation of a disassembly, in code order: every global atomic
    or reduction (kernels._last_arrival) and every acquire load (a flag's poll: a strong GPU-scope load, then an L1
    invalidation). "release": a CTA barrier before it (every thread's stores first) and a GPU-scope memory barrier
    right before it; "acquire": an L1 invalidation right after it (the reads that follow see other programs'
    writes); "acq_rel": both; "relaxed": neither (which no kernel here may have)."""
    lines = [m[1] for m in re.finditer(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*)$", sass, re.M)]
    out = []
    for i, ins in enumerate(lines):
        acquire = any("CCTL.IVALL" in a for a in lines[i + 1 : i + 3])
        if re.search(r"\b(ATOMG?|REDG?)\.", ins) or ("LDG" in ins and "STRONG.GPU" in ins and acquire):
            before = lines[max(0, i - 24) : i]
            release = any("BAR.SYNC" in b for b in before) and any("MEMBAR" in b and "GPU" in b for b in before[-4:])
            out.append({(True, True): "acq_rel", (True, False): "release", (False, True): "acquire"}.get((release, acquire), "relaxed"))
    return out


def loops(sass: str) -> list[dict]:
    """Each loop of a disassembly (a branch back to an earlier label), in code order: its body's instructions
    ("size"), the CTA barriers in it ("barriers": each one a stop of every warp of the program, as a layout
    conversion through shared memory takes two), and the global loads after its backward branch to the end of
    the code ("loads_after")."""
    labels, pending, found, code = {}, [], [], []
    for line in sass.splitlines():
        m = re.match(r"(\.L_x_\d+):", line)
        if m:
            pending.append(m[1])
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*)", line)
        if not m:
            continue
        addr = int(m[1], 16)
        labels.update((name, addr) for name in pending)
        pending = []
        code.append((addr, m[2]))
        b = re.search(r"BRA.*`\((\.L_x_\d+)\)", m[2])
        if b and b[1] in labels and labels[b[1]] <= addr:
            found.append((labels[b[1]], addr))
    out = []
    for start, end in found:
        body = [ins for a, ins in code if start <= a <= end]
        after = [ins for a, ins in code if a > end]
        out.append({"size": (end - start) // 16 + 1, "barriers": sum("BAR.SYNC" in ins for ins in body),
                    "loads_after": sum(bool(re.match(r"(@!?U?P\w+\s+)?LDG", ins)) for ins in after)})  # fmt: skip
    return out


def per_weight(fn, const: dict, opts: dict, bodies: list[int]) -> float | None:
    """SASS instructions a thread issues per weight in a GEMV's main loop (its last loop of more than one
    instruction): the loop body over the weights one thread covers per iteration (BLOCK_N rows × BLOCK_W int32
    words, 16 weights a word for t2, 4 for int8)."""
    per_word = {K._gemv_w2a8_kernel: 16, K._gemv_packed_kernel: 16, K._gemv_w8a8_kernel: 4}.get(fn)
    loops = [b for b in bodies if b > 1]
    if per_word is None or not loops:
        return None
    weights = const["BLOCK_N"] * const["BLOCK_W"] * per_word / (32 * opts["num_warps"])
    return loops[-1] / weights


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="one launch configuration per kernel variant")
    ap.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    args = ap.parse_args()
    rows = []
    for label, fn, a, const, opts in variants(args.quick):
        try:
            row = {"kernel": label, **compile_one(fn, a, const, opts, args.arch)}
            row["instr_per_weight"] = per_weight(fn, const, opts, [lp["size"] for lp in row["loops"]])
        except Exception as e:  # noqa: BLE001 - report every kernel that fails, not just the first
            row = {"kernel": label, "error": f"{type(e).__name__}: {str(e)[:400]}"}
        rows.append(row)
        if not args.json:
            if "error" in row:
                print(f"{label:<58} FAILED {row['error']}", flush=True)
            else:
                ipw = f"{row['instr_per_weight']:.2f}" if row["instr_per_weight"] is not None else ""
                ops = row["sync_ops"]
                sync = f"  sync {'/'.join(f'{ops.count(k)} {k}' for k in ('acq_rel', 'release', 'acquire', 'relaxed') if k in ops)}" if ops else ""
                print(f"{label:<58} regs {row.get('registers', '?'):>4}  stack {row.get('stack_bytes', '?'):>4} B  "
                      f"local {row.get('local_bytes', '?'):>4} B  "
                      f"smem {row['shared_bytes']:>6} B  sass {row['sass_instructions']:>5}  loop/weight {ipw:>5}{sync}"
                      + (f"  bf16 fma {row['bf16_fma']}" if row["bf16_fma"] else ""), flush=True)  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
