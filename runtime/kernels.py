"""Triton kernels for BitLinear on packed t2 weights (formats/PACKED.md §2.1): the CUDA fast path.

The math is BitLinear's (runtime/bitlinear.py, REFERENCE §2), reproduced bit for bit:

    s = 127 · (1 / max(max|x|, 1e-5))    fp32, per row of x: what torch's ``127.0 / tensor`` computes
    q = clamp(rint(x · s), -128, 127)     int8, round half to even like torch.round
    y = (q · tᵀ) · scale / s              q · tᵀ summed exactly in int32; scale f32 [1] or [N]

Kernels
- ``quantize_act``: the activation quantization alone (one program per row).
- ``bitlinear_gemv`` (decode, M ≤ ``GEMV_MAX_M``): W2A8 GEMV on the packed bytes read as int32 words (16 weights
  each, 16-byte loads along K). The quantization is fused: every program recomputes max|x| (x is a few KB and
  sits in L2), quantizes its K chunk in registers and packs it into int8×4 words. Each 2-bit field k of a weight
  word is masked out as four byte lanes, ``(w >> 2k) & 0x03030303`` = codes of weights k, k+4, k+8, k+12, and
  one ``dp4a`` multiplies them with the activation word holding those four activations: 4 MACs per instruction,
  about 0.75 integer instructions per weight (plus the activation packing, shared by the BLOCK_N rows of a
  program), so the kernel stays bound by memory, not by unpacking. The codes
  are t + 1, so Σ c·q − Σ q = Σ t·q; Σ q comes out of the same dp4a pass. The first weight tile is fetched
  before max|x|, the next one during each tile's math.
- ``pack_act`` + ``bitlinear_gemv_packed`` (FastModel(gemv="packed"), the CUDA default): the input (with its
  norm / act) quantized and packed into dp4a words once per row, then a GEMV whose loop is only shift, mask and
  dp4a: about one SASS instruction per weight instead of two to four (benchmarks/kernel_resources.py counts them
  offline). Its tiles go up to a whole row (one weight fetch per program, no K loop). The graph decode step's
  tiles are picked by timing the whole step (runtime/fast.py's ``GraphDecoder.search_tiles``); other calls
  autotune.
- Folded packing (``NextPack``; FastModel(gemv="folded")): the packed GEMV and the split attention take the
  ``pack_act`` of their own output into the same launch. Each program arrives on an atomic counter after its
  stores (``_last_arrival``: a barrier, then one acq_rel atomic per program), and the last to arrive, which then
  sees every other program's output, packs the row for the next GEMV and sets the counter back to zero. In the
  attention a first counter per head makes the head's last split run its combine.
- ``bitlinear_matmul`` (prefill): quantize once, then tiles of int8 x and of weights unpacked to int8 in
  registers meet in ``tl.dot`` int8 × int8 → int32 on the tensor cores (``int8_dot=False``: fp16 operands with
  fp32 accumulation, still exact below 2^24).
- ``head_int8``: the optional int8 output head (per-row absmax scales from runtime/bitlinear.py's
  ``quantize_head``, int8 activations), the same dp4a GEMV on int8 weights.
- ``rmsnorm`` (optionally with the residual add) and ``act_mul_norm`` (relu²/SiLU gate · up + the MLP sub-norm):
  one launch each instead of the handful of torch ops they replace in the decode step.
- ``decode_attention``: rope, the KV-cache write and the attention of one decode token, one kernel or split over
  chunks of the cache plus a combine (flash-decoding); optionally its programs also bring the weights of the
  GEMVs after it into L2 (``prefetch``, ``_l2_prefetch``).
- ``argmax``: the greedy step's argmax in one launch (block maxima, then the last program reduces them).
- ``sample``: the sampled step's draw with a top-k (then top-p and min-p) in one launch (each block's first k
  in order, merged by the last program, which draws by an exponential race over Philox numbers; ties at the
  k-th logit kept past the merge are found by walking the logits). Without a top-k, the top-p cut is a radix
  select over the values' bits, 4 bits a launch, all programs binning the mass of the candidates and the last
  one choosing the digit (``_nucleus_level_kernel``), then a launch of the race (``_nucleus_race_kernel``).
- ``bitlinear_op`` / ``head_int8_op``: the same as torch.library custom ops, opaque to torch.compile.

``pdl=True`` (the decode-step kernels): programmatic dependent launch on sm_90+, see ``_pdl_enter``; ``pdl="early"``
the same, with each kernel letting the next one launch before its wait, not after; ``pdl="early-packs"`` that only in
``pack_act`` and the attention's combine (``_pdl``).

Under ``TRITON_INTERPRET=1`` (tests on the CPU) dp4a and rint are computed with plain integer / float ops
instead of the PTX instruction and the libdevice call, which the interpreter cannot run; the arithmetic is the
same, and the GPU tests (``pytest -m gpu``) check the device versions against the reference.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

try:  # programmatic dependent launch (sm_90+): in triton ≥ 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: _pdl launches without it
    gdc_launch_dependents = gdc_wait = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Decode GEMV for up to this many rows of x; the tensor-core matmul above it.
GEMV_MAX_M = 4

# 1.5 · 2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to an integer, half to even (interpreter rint).
_RINT_MAGIC = 12582912.0


class KernelShapeError(ValueError):
    """Inputs to a kernel wrapper have shapes, dtypes or devices that do not fit together."""


# --------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _rint(v, ON_GPU: tl.constexpr):
    # round half to even; |v| ≤ ~128 here
    if ON_GPU:
        return libdevice.rint(v)
    else:
        return (v + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def _dp4a(a, b, c, ON_GPU: tl.constexpr):
    # c + Σ_i a.byte[i] · b.byte[i], bytes as signed int8; a, b, c int32 of one shape
    if ON_GPU:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        r = c
        for i in tl.static_range(4):
            r += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
        return r


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    # Launched with programmatic dependent launch, a kernel may start while the previous one still runs (hiding
    # the launch gap). It waits here, before any read of the previous kernels' outputs or any write, until that
    # kernel has finished and its writes are visible. PDL 1: then it lets the next kernel start launching, which
    # becomes resident only once every block of this grid is past its wait, and waits the same way. PDL 2
    # (pdl="early"; with "early-packs" only in the packs and the combine, _pdl): it lets the next kernel launch
    # first, so that kernel can be resident, and its weights in flight, while this one still waits; and the kernel
    # after it, as soon as that one is resident (as deep as the multiprocessors hold them). Still correct: a wait
    # is for the previous grid's completion, whenever that grid let this one launch, and every block of every
    # kernel waits, so a kernel completes only after all before it (PTX ISA, griddepcontrol). What moves earlier is
    # only what comes before the wait, which in every kernel here reads only what no kernel of the step writes
    # (weights, scales, norm weights, the position, older cache slots).
    if PDL == 2:
        gdc_launch_dependents()
        gdc_wait()
    elif PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _l2_prefetch(ptr, nbytes, part, n_parts, cnt_ptr, BLOCK: tl.constexpr, ON_GPU: tl.constexpr,
                 COUNT: tl.constexpr = False):  # fmt: skip
    # Bring program ``part`` of ``n_parts``' share of the 128-byte lines of ptr[0 .. nbytes) into L2: a
    # contiguous run of lines a program, BLOCK lines (one a thread) a pass. A prefetch has no destination register,
    # so the program does not wait for it. Nothing under the interpreter, except with COUNT (tests): each line's
    # counter cnt_ptr[line] is incremented instead, so a test sees every line covered once.
    if ON_GPU or COUNT:
        lines = tl.cdiv(nbytes, 128)
        per = tl.cdiv(lines, n_parts)
        lo = part * per
        hi = tl.minimum(lines, lo + per)
        base = ptr.to(tl.pointer_type(tl.int8))
        for l0 in range(lo, hi, BLOCK):
            li = l0 + tl.arange(0, BLOCK)
            if COUNT:
                tl.atomic_add(cnt_ptr + li, 1, mask=li < hi)
            else:
                at = base + tl.where(li < hi, li, l0).to(tl.int64) * 128  # past hi: line l0 again, harmless
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [at], dtype=tl.int32,
                                          is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _prefetch_regions(pf0, pf1, pf2, pf3, pf0_n, pf1_n, pf2_n, pf3_n, N_PF: tl.constexpr, ON_GPU: tl.constexpr):
    # the first N_PF of the regions pf0..pf3 (pf*_n bytes each) into L2, each spread over all the programs of a 2-D
    # grid (_l2_prefetch; its counter argument, read only by the tests' COUNT, is the region itself here):
    # decode_attention's ``prefetch``, the weights of the kernels after it
    part = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    n_parts = tl.num_programs(0) * tl.num_programs(1)
    if N_PF > 0:
        _l2_prefetch(pf0, pf0_n, part, n_parts, pf0, 128, ON_GPU)
    if N_PF > 1:
        _l2_prefetch(pf1, pf1_n, part, n_parts, pf1, 128, ON_GPU)
    if N_PF > 2:
        _l2_prefetch(pf2, pf2_n, part, n_parts, pf2, 128, ON_GPU)
    if N_PF > 3:
        _l2_prefetch(pf3, pf3_n, part, n_parts, pf3, 128, ON_GPU)


@triton.jit
def _row_block(w_ptr, N, stride_wn, BLOCK_N: tl.constexpr):
    # a GEMV program's rows: (input row m, output rows [BLOCK_N], their mask, weight row pointers [BLOCK_N, 1])
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), rows, rows < N, w_ptr + rows.to(tl.int64)[:, None] * stride_wn


@triton.jit
def _row_scales(scale_ptr, rows, row_ok, SCALE_PER_ROW: tl.constexpr):
    # the weight scale of each output row [BLOCK_N], or the tensor's one scale. Weights' scales are constants of
    # the step, so a kernel reads them before its PDL wait: a 4-byte read that the weights streamed since the last
    # token evicted from L2, which after the dot loop cost a DRAM round trip at the end of every GEMV
    if SCALE_PER_ROW:
        sc = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
    else:
        sc = tl.broadcast_to(tl.load(scale_ptr), rows.shape)
    return sc


@triton.jit
def _residual(res_ptr, m, rows, row_ok, stride_rm, HAS_RES: tl.constexpr):
    # the residual's values of row m at the output rows, in fp32 (0 without HAS_RES), read once the input is ready
    # (after the PDL wait) but before the dot loop, so its L2 round trip overlaps the weights'
    r = tl.zeros(rows.shape, dtype=tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + m.to(tl.int64) * stride_rm + rows, mask=row_ok, other=0.0).to(tl.float32)
    return r


@triton.jit
def _gemv_store(dot, s, sc, r, m, rows, row_ok, y_ptr, stride_ym, HAS_RES: tl.constexpr):
    # y = dot · sc / s rounded to y's dtype (+ the residual r of _residual: both terms in that dtype, the sum
    # rounded to it); sc: _row_scales
    y = tl.div_rn(dot.to(tl.float32) * sc, s)
    dt = y_ptr.dtype.element_ty
    if HAS_RES:
        y = r + y.to(dt).to(tl.float32)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + rows, y.to(dt), mask=row_ok)


@triton.jit
def _weight_tile(w_rows, row_ok, w0, n_words, BLOCK_W: tl.constexpr):
    # int32 weight words [BLOCK_N, BLOCK_W] of columns w0.. (0 past n_words or past the last row: no memory access)
    cols = w0 + tl.arange(0, BLOCK_W)
    return tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < n_words)[None, :], other=0)


@triton.jit
def _act_mul(g, u, RELU2: tl.constexpr, dt: tl.constexpr):
    # act(gate) · up in fp32, each op rounded to the model dtype dt like MLP.forward's torch ops
    if RELU2:
        a = tl.maximum(g, 0.0)
        a = (a * a).to(dt).to(tl.float32)  # torch.square(F.relu(g))
    else:
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # SiLU (rounding may differ from torch's)
    return (a * u).to(dt).to(tl.float32)


@triton.jit
def _norm_apply(v, rstd, w, dt: tl.constexpr):
    # RMSNorm's last steps on fp32 values: w · (v · rstd).to(dt), rounded to dt, back in fp32
    return (w * (v * rstd).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _gemv_input(x_row, nw_ptr, j, ok, K, rstd, ACT: tl.constexpr, NORM: tl.constexpr, RELU2: tl.constexpr,
                CG: tl.constexpr = False):  # fmt: skip
    # fp32 values at element indices j of a GEMV's input row: x, or with ACT (x_row = gate | up, 2K wide)
    # act(gate)·up; then with NORM the RMSNorm (weight nw_ptr [K], 1/rms = rstd). Masked elements give 0.
    # CG: read x from L2 (ld.cg), not through L1: x was written by other programs of the same launch (_last_arrival)
    dt = x_row.dtype.element_ty
    cm: tl.constexpr = ".cg" if CG else ""
    if ACT:
        g = tl.load(x_row + j, mask=ok, other=0.0, cache_modifier=cm).to(tl.float32)
        u = tl.load(x_row + K + j, mask=ok, other=0.0, cache_modifier=cm).to(tl.float32)
        v = _act_mul(g, u, RELU2, dt)
    else:
        v = tl.load(x_row + j, mask=ok, other=0.0, cache_modifier=cm).to(tl.float32)
    if NORM:
        v = _norm_apply(v, rstd, tl.load(nw_ptr + j, mask=ok, other=0.0).to(tl.float32), dt)
    return v


@triton.jit
def _input_scale(x_row, nw_ptr, K, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
    # (s, rstd) of one input row of K values (_gemv_input): s = 127 · (1 / max(max|in|, 1e-5)) in fp32, and
    # with NORM rstd = rsqrt(mean(x²) + eps) of the values before the norm. Every program of a GEMV recomputes
    # them (the row is a few KB and sits in L2), so the int8 head's final norm costs no launch of its own.
    rstd = 1.0
    if NORM:
        ss = tl.zeros((BLOCK,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = _gemv_input(x_row, nw_ptr, offs, offs < K, K, rstd, False, False, False)
            ss += v * v
        rstd = tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_gemv_input(x_row, nw_ptr, offs, offs < K, K, rstd, False, NORM, False)))
    m = tl.maximum(tl.max(amax, axis=0), 1e-5)
    return tl.div_rn(1.0, m) * 127.0, rstd


@triton.jit
def _quant(xv, s, ON_GPU: tl.constexpr):
    # fp32 values → int32 in [-128, 127]
    q = _rint(xv * s, ON_GPU)
    return tl.minimum(tl.maximum(q, -128.0), 127.0).to(tl.int32)


# --------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, ON_GPU: tl.constexpr):
    # one program per row: x [M, K] float → q int8 [M, K], s f32 [M]
    m = tl.program_id(0)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    s, _ = _input_scale(x_row, x_row, K, 0.0, False, BLOCK)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        xv = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + m.to(tl.int64) * stride_qm + offs, _quant(xv, s, ON_GPU).to(tl.int8), mask=offs < K)
    tl.store(s_ptr + m, s)


@triton.jit
def _gemv_w2a8_kernel(
    x_ptr, w_ptr, scale_ptr, y_ptr,
    N, K, K16,
    stride_xm, stride_wn, stride_ym,
    SCALE_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
    ON_GPU: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # x [M, K] float; w: t2 bytes viewed as int32 words [N, K16] (word = 16 weights of a row); y [M, N] = x·Wᵀ;
    # grid (cdiv(N, BLOCK_N), M). BLOCK_P: max|x|'s chunk (prologue_block), as large as registers allow, since
    # each chunk is a wait on memory
    m, rows, row_ok, w_rows = _row_block(w_ptr, N, stride_wn, BLOCK_N)
    # the first weight tile is fetched before anything else: weights do not depend on earlier kernels (so this
    # may run before _pdl_enter's wait), and the fetch overlaps max|x| below
    wt_next = _weight_tile(w_rows, row_ok, 0, K16, BLOCK_W)
    sc = _row_scales(scale_ptr, rows, row_ok, SCALE_PER_ROW)
    _pdl_enter(PDL)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    s, _ = _input_scale(x_row, x_row, K, 0.0, False, BLOCK_P)

    lane = tl.arange(0, 4)  # byte lane i of an activation word
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)  # Σ c·q per (row, word column)
    qsum = tl.zeros((BLOCK_W,), dtype=tl.int32)  # Σ q
    ones = tl.full((BLOCK_W,), 0x01010101, dtype=tl.int32)
    for w0 in range(0, K16, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        wt = wt_next
        wt_next = _weight_tile(w_rows, row_ok, w0 + BLOCK_W, K16, BLOCK_W)  # in flight during this tile's math
        for k in tl.static_range(4):
            # activation word for field k: byte i = q[16·col + 4i + k], the weights that field k holds
            j = cols[:, None] * 16 + lane[None, :] * 4 + k  # [BLOCK_W, 4]
            xv = tl.load(x_row + j, mask=j < K, other=0.0).to(tl.float32)
            q = _quant(xv, s, ON_GPU)  # masked positions give q = 0, so padding codes never count
            xw = tl.sum((q & 0xFF) << (lane[None, :] * 8), axis=1)  # [BLOCK_W] packed int8×4
            qsum = _dp4a(ones, xw, qsum, ON_GPU)
            codes = (wt >> (2 * k)) & 0x03030303  # [BLOCK_N, BLOCK_W] four codes in byte lanes
            acc = _dp4a(codes, tl.broadcast_to(xw[None, :], (BLOCK_N, BLOCK_W)), acc, ON_GPU)
    dot = tl.sum(acc, axis=1) - tl.sum(qsum, axis=0)  # [BLOCK_N] Σ t·q, exact
    _gemv_store(dot, s, sc, 0.0, m, rows, row_ok, y_ptr, stride_ym, False)


@triton.jit
def _norm_weights(nw_ptr, K, BLOCK_C: tl.constexpr, NORM: tl.constexpr):
    # a _pack_row's norm weights [16·BLOCK_C] in fp32 (0 past K; all 0 without NORM). A constant of the step: a
    # pack_act reads them before its PDL wait. Read after the row's sum of squares, as they were, they cost each
    # pack a DRAM round trip (the weights streamed since the last token evicted them from L2) after a barrier
    nw = tl.zeros((BLOCK_C * 16,), dtype=tl.float32)
    if NORM:
        offs = tl.arange(0, BLOCK_C * 16)
        nw = tl.load(nw_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
    return nw


@triton.jit
def _pack_row(x_row, nw, xq_row, s_ptr, qs_ptr, K, K16, eps, ACT: tl.constexpr, NORM: tl.constexpr,
              RELU2: tl.constexpr, BLOCK_C: tl.constexpr, ON_GPU: tl.constexpr, CG: tl.constexpr):  # fmt: skip
    # one GEMV input row (x, norm(x), or [norm](act(gate)·up), as _gemv_input) quantized once and packed the way
    # the dp4a loop reads it: xq_row [4, K16] int32, word (k, c) holds q[16c + 4i + k] in byte i (field-major, so
    # that the GEMV loop reads one contiguous vector per field); s_ptr ← the row's scale; qs_ptr ← Σ q (the
    # t = code − 1 correction). nw: _norm_weights. The whole row is loaded at once (16·BLOCK_C ≥ K values) as one
    # contiguous vector: wide loads, one wait on memory, the statistics and the packing on registers.
    dt = x_row.dtype.element_ty
    offs = tl.arange(0, BLOCK_C * 16)
    ok = offs < K
    v = _gemv_input(x_row, None, offs, ok, K, 1.0, ACT, False, RELU2, CG)
    if NORM:
        rstd = tl.math.rsqrt(tl.sum(v * v, axis=0) / K + eps)
        v = _norm_apply(v, rstd, nw, dt)
    amax = tl.max(tl.abs(v), axis=0)
    s = tl.div_rn(1.0, tl.maximum(amax, 1e-5)) * 127.0
    q = _quant(v, s, ON_GPU)  # [16·C]; 0 past K
    i = tl.arange(0, 4)  # byte lane
    words = tl.sum(tl.reshape(q & 0xFF, (BLOCK_C, 4, 4)) << (i[None, :, None] * 8), axis=1)  # [C, k] of [c, i, k]
    cols = tl.arange(0, BLOCK_C)
    k = tl.arange(0, 4)
    tl.store(xq_row + k[None, :] * K16 + cols[:, None], words, mask=(cols < K16)[:, None])
    tl.store(s_ptr, s)
    tl.store(qs_ptr, tl.sum(q, axis=0))


@triton.jit
def _act_fields(xq_row, w0, K16, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # the four fields' activation words of columns w0 .. w0 + BLOCK_W − 1 of a _pack_row row xq_row [4, K16], each
    # as a [BLOCK_N, BLOCK_W] tile of equal rows: loaded straight into the weight tile's layout (each thread the
    # words its own dp4a's take), so the four loads are in flight at once. Loaded as one [BLOCK_W] vector and
    # broadcast, each field passed through shared memory between two barriers, and the next field's load waited
    # for them: four L2 round trips one after another a tile (benchmarks/kernel_resources.py counts the barriers
    # in the loop: 8 a tile before, none now). Masked past K16: 0, no memory access
    cols = w0 + tl.arange(0, BLOCK_W)
    at = xq_row + (cols[None, :] + tl.zeros((BLOCK_N, 1), dtype=tl.int32))  # [BLOCK_N, BLOCK_W], rows alike
    ok = (cols < K16)[None, :] & (tl.zeros((BLOCK_N, 1), dtype=tl.int32) == 0)
    return (tl.load(at, mask=ok, other=0), tl.load(at + K16, mask=ok, other=0), tl.load(at + 2 * K16, mask=ok, other=0),
            tl.load(at + 3 * K16, mask=ok, other=0))  # fmt: skip


@triton.jit
def _packed_dot(xq_row, w_rows, row_ok, wt_first, K16, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                ON_GPU: tl.constexpr):  # fmt: skip
    # Σ c·q [BLOCK_N] of the weight rows w_rows [BLOCK_N, 1] (codes c = t + 1) with a _pack_row row xq_row
    # [4, K16]; wt_first: their first _weight_tile, fetched by the caller (before its wait). Each next weight tile
    # and its four activation fields (_act_fields) are fetched one tile ahead, in flight during a tile's math
    # (fetched in the tile that used them, the four field loads were spread over the math by the compiler, one L2
    # round trip after another)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)  # Σ c·q per (row, word column)
    wt_next = wt_first
    xf_next = _act_fields(xq_row, 0, K16, BLOCK_N, BLOCK_W)
    for w0 in range(0, K16, BLOCK_W):
        wt = wt_next
        x0, x1, x2, x3 = xf_next
        wt_next = _weight_tile(w_rows, row_ok, w0 + BLOCK_W, K16, BLOCK_W)
        xf_next = _act_fields(xq_row, w0 + BLOCK_W, K16, BLOCK_N, BLOCK_W)
        acc = _dp4a(wt & 0x03030303, x0, acc, ON_GPU)  # field k: the codes in bits 2k, 2k + 1 of each byte
        acc = _dp4a((wt >> 2) & 0x03030303, x1, acc, ON_GPU)
        acc = _dp4a((wt >> 4) & 0x03030303, x2, acc, ON_GPU)
        acc = _dp4a((wt >> 6) & 0x03030303, x3, acc, ON_GPU)
    return tl.sum(acc, axis=1)


@triton.jit
def _last_arrival(cnt_ptr, n):
    # True in the last of the n programs that call this on one int32 counter (zero before the launch), which then
    # sees every other caller's global writes made before its call; it sets the counter back to zero for the next
    # launch (a CUDA graph replays the same counter). The barrier puts all of this program's stores before its
    # release (the atomic runs once per program); the acquire puts the other programs' before the last one's reads.
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n - 1
    if last:
        tl.store(cnt_ptr, 0)
    return last


@triton.jit
def _pack_act_kernel(
    x_ptr, nw_ptr, xq_ptr, s_ptr, qs_ptr,
    K, K16, eps, stride_xm, stride_xq,
    ACT: tl.constexpr, NORM: tl.constexpr, RELU2: tl.constexpr, BLOCK_C: tl.constexpr, ON_GPU: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    # one program per row m: _pack_row of x [M, K] (gate | up [M, 2K] with ACT) into xq [M, 4, K16], s, qs [M]
    nw = _norm_weights(nw_ptr, K, BLOCK_C, NORM)
    _pdl_enter(PDL)
    m = tl.program_id(0)
    _pack_row(x_ptr + m.to(tl.int64) * stride_xm, nw, xq_ptr + m.to(tl.int64) * stride_xq, s_ptr + m, qs_ptr + m,
              K, K16, eps, ACT, NORM, RELU2, BLOCK_C, ON_GPU, False)  # fmt: skip


@triton.jit
def _gemv_packed_kernel(
    xq_ptr, s_ptr, qs_ptr, w_ptr, scale_ptr, res_ptr, y_ptr,
    N, K16, stride_xq, stride_wn, stride_rm, stride_ym,
    cnt_ptr, p_nw_ptr, p_xq_ptr, p_s_ptr, p_qs_ptr, P_K, P_K16, p_eps, p_stride_xq,
    HAS_RES: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
    ON_GPU: tl.constexpr, PDL: tl.constexpr = False, PACK: tl.constexpr = False, P_ACT: tl.constexpr = False,
    P_NORM: tl.constexpr = False, P_RELU2: tl.constexpr = False, P_BLOCK_C: tl.constexpr = 1,
):  # fmt: skip
    # _gemv_w2a8_kernel's loop on activations _pack_row prepared: per weight word one shift, one mask and one
    # dp4a per 2-bit field, nothing else (about 0.9 SASS instructions a weight at BLOCK_N 16, against about 2
    # with the quantization in the loop: benchmarks/kernel_resources.py). y [M, N] (+ res). PACK (the folded
    # decode step, FastModel(gemv="folded")): the last program to finish row m (cnt_ptr [M]) packs y's row for
    # the next GEMV (_pack_row with the P_* options: P_K = N, or N / 2 with P_ACT) into p_xq / p_s / p_qs, the
    # work of one pack_act launch without the launch
    m, rows, row_ok, w_rows = _row_block(w_ptr, N, stride_wn, BLOCK_N)
    wt_first = _weight_tile(w_rows, row_ok, 0, K16, BLOCK_W)  # before the wait, as in _gemv_w2a8_kernel
    sc = _row_scales(scale_ptr, rows, row_ok, SCALE_PER_ROW)
    _pdl_enter(PDL)
    # the input's scale, Σ q and the residual: read with the first activation words, not after the loop
    s = tl.load(s_ptr + m)
    qs = tl.load(qs_ptr + m)
    r = _residual(res_ptr, m, rows, row_ok, stride_rm, HAS_RES)
    xq_row = xq_ptr + m.to(tl.int64) * stride_xq
    dot = _packed_dot(xq_row, w_rows, row_ok, wt_first, K16, BLOCK_N, BLOCK_W, ON_GPU) - qs
    _gemv_store(dot, s, sc, r, m, rows, row_ok, y_ptr, stride_ym, HAS_RES)
    if PACK:
        if _last_arrival(cnt_ptr + m, tl.num_programs(0)):
            _pack_row(y_ptr + m.to(tl.int64) * stride_ym, _norm_weights(p_nw_ptr, P_K, P_BLOCK_C, P_NORM),
                      p_xq_ptr + m.to(tl.int64) * p_stride_xq, p_s_ptr + m, p_qs_ptr + m, P_K, P_K16, p_eps, P_ACT, P_NORM,
                      P_RELU2, P_BLOCK_C, ON_GPU, True)  # fmt: skip


@triton.jit
def _mm_w2a8_kernel(
    q_ptr, s_ptr, w_ptr, scale_ptr, y_ptr,
    M, N, K, KB,
    stride_qm, stride_wn, stride_ym,
    M_BUCKET,  # unused in the body: the autotuner's key, so that a 16-row and a 512-row prefill tune apart
    SCALE_PER_ROW: tl.constexpr, INT8_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # q int8 [M, K] (quantize_act), s f32 [M]; w t2 bytes [N, KB]; y [M, N]; 1-D grid, grouped for L2 reuse
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    if INT8_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(q_ptr + rm.to(tl.int64)[:, None] * stride_qm + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0)
        # the weight tile's bytes [BLOCK_N, BLOCK_K / 4], contiguous along K (wide loads the pipeliner can stage),
        # unpacked in registers to [BLOCK_K, BLOCK_N]: weight k of a row is field k % 4 of byte k // 4. Loaded
        # as one byte per weight instead, the tile took 64 single-byte loads a thread at 128×128×128, each byte
        # four times, outside the pipeline (benchmarks/kernel_resources.py). Past K: code 1 (t = 0), and a = 0
        kb = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        wb = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + kb[None, :], mask=n_ok[:, None] & (kb < KB)[None, :], other=0x55)
        f = tl.arange(0, 4)
        t = ((wb.to(tl.int32)[:, :, None] >> (f * 2)[None, None, :]) & 3) - 1  # [BLOCK_N, BLOCK_K / 4, 4]
        t = tl.trans(tl.reshape(t, (BLOCK_N, BLOCK_K)))  # [BLOCK_K, BLOCK_N]
        if INT8_DOT:
            acc = tl.dot(a, t.to(tl.int8), acc, out_dtype=tl.int32)
        else:
            # fp16 holds every |q| ≤ 128 and t exactly; fp16 rather than bf16 because Triton's interpreter computes
            # bf16 dots wrongly (triton 3.9), and both run on the same tensor cores
            acc = tl.dot(a.to(tl.float16), t.to(tl.float16), acc, out_dtype=tl.float32)
    s = tl.load(s_ptr + rm, mask=m_ok, other=1.0)
    if SCALE_PER_ROW:
        sc = tl.load(scale_ptr + rn, mask=n_ok, other=1.0)[None, :]
    else:
        sc = tl.load(scale_ptr)
    y = tl.div_rn(acc.to(tl.float32) * sc, s[:, None])
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gemv_w8a8_kernel(
    x_ptr, nw_ptr, w_ptr, scale_ptr, y_ptr,
    N, K, K4, eps,
    stride_xm, stride_wn, stride_ym,
    NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr, ON_GPU: tl.constexpr,
    PDL: tl.constexpr = False,
):  # fmt: skip
    # x [M, K] float (the final RMSNorm applied here with NORM); w int8 weights viewed as int32 words [N, K4]
    # (4 weights each); scale f32 [N]; y f32 [M, N]
    m, rows, row_ok, w_rows = _row_block(w_ptr, N, stride_wn, BLOCK_N)
    sc = _row_scales(scale_ptr, rows, row_ok, True)
    _pdl_enter(PDL)
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    s, rstd = _input_scale(x_row, nw_ptr, K, eps, NORM, BLOCK_P)
    lane = tl.arange(0, 4)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.int32)
    for w0 in range(0, K4, BLOCK_W):
        cols = w0 + tl.arange(0, BLOCK_W)
        wt = _weight_tile(w_rows, row_ok, w0, K4, BLOCK_W)
        j = cols[:, None] * 4 + lane[None, :]  # natural order: byte i of word col is element 4·col + i
        xv = _gemv_input(x_row, nw_ptr, j, j < K, K, rstd, False, NORM, False)
        xw = tl.sum((_quant(xv, s, ON_GPU) & 0xFF) << (lane[None, :] * 8), axis=1)
        acc = _dp4a(wt, tl.broadcast_to(xw[None, :], (BLOCK_N, BLOCK_W)), acc, ON_GPU)
    # per-row scales, f32 logits, no residual
    _gemv_store(tl.sum(acc, axis=1), s, sc, None, m, rows, row_ok, y_ptr, stride_ym, False)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, res_ptr, h_ptr, w_ptr, y_ptr, D, eps,
    stride_x, stride_res, stride_h, stride_y,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one program per row: [h = x + res;] y = w · (h · rsqrt(mean(h²) + eps)).to(dtype), rounding like
    # runtime/model.py's RMSNorm (the sum of squares is reduced in another order: fp32 rounding differs)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < D
    dt = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + offs, mask=ok, other=0.0).to(tl.float32)
        x = (x + r).to(dt).to(tl.float32)  # the residual add rounds to the model dtype
        tl.store(h_ptr + row * stride_h + offs, x.to(dt), mask=ok)
    w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = _norm_apply(x, tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps), w, dt)
    tl.store(y_ptr + row * stride_y + offs, y.to(dt), mask=ok)


@triton.jit
def _act_mul_norm_kernel(
    gu_ptr, w_ptr, y_ptr, I, eps, stride_gu, stride_y,
    RELU2: tl.constexpr, HAS_NORM: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one program per row of the fused gate|up output [M, 2I]: z = act(g) · u, then the MLP sub-norm
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < I
    dt = y_ptr.dtype.element_ty
    z = _gemv_input(gu_ptr + row * stride_gu, w_ptr, offs, ok, I, 1.0, True, False, RELU2)  # act(g) · u
    if HAS_NORM:
        w = tl.load(w_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z = _norm_apply(z, tl.math.rsqrt(tl.sum(z * z, axis=0) / I + eps), w, dt)
    tl.store(y_ptr + row * stride_y + offs, z.to(dt), mask=ok)


@triton.jit
def _opaque(x, ON_GPU: tl.constexpr):
    # x (fp32) unchanged, through a move LLVM cannot see into on the GPU: a product passed through it is not
    # contracted with the add after it. Without it `(a·b).to(bf16)` added to another such product compiled to one
    # fma.rn.bf16, which skips the product's rounding: the rope's k differed from torch's in 1 of 5 values by one
    # bf16 step (2026-11-27, H200; benchmarks/kernel_resources.py counts bf16 FMAs, tests/test_kernel_compile.py
    # asserts there are none)
    if ON_GPU:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return x


@triton.jit
def _rope_half(lo, hi, c_lo, c_hi, s_lo, s_hi, dt: tl.constexpr, ON_GPU: tl.constexpr):
    # runtime/model.py's rope on the two halves of one head: x·cos + rotate_half(x)·sin, each op rounded to dt
    # (rotate_half(x) = (−hi, lo)); returns the roped (lo, hi) in fp32. The products of bf16 values are exact in
    # fp32, and fp32 then dt rounds as one rounding to dt would, so these are torch's bytes
    r_lo = (_opaque(lo * c_lo, ON_GPU).to(dt).to(tl.float32) + _opaque(-hi * s_lo, ON_GPU).to(dt).to(tl.float32)).to(dt)
    r_hi = (_opaque(hi * c_hi, ON_GPU).to(dt).to(tl.float32) + _opaque(lo * s_hi, ON_GPU).to(dt).to(tl.float32)).to(dt)
    return r_lo.to(tl.float32), r_hi.to(tl.float32)


@triton.jit
def _load_halves(row, offs, ok, half):
    # the lo / hi halves of one head-dim row (rope tables, q, k, v) as fp32 [HALF] each
    return tl.load(row + offs, mask=ok, other=0.0).to(tl.float32), tl.load(row + half + offs, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _kv_block(cache_k, cache_v, start, hi, stride_ks, offs, ok, half, BLOCK_N: tl.constexpr):
    # cached keys and values of rows start .. start + BLOCK_N − 1 below hi, as stored: 4 × [BLOCK_N, HALF] (the
    # lo / hi halves of each head dim; 0 past hi, with no memory access)
    rows = start + tl.arange(0, BLOCK_N)
    at = rows.to(tl.int64)[:, None] * stride_ks + offs[None, :]
    both = (rows < hi)[:, None] & ok[None, :]
    return (tl.load(cache_k + at, mask=both, other=0.0), tl.load(cache_k + half + at, mask=both, other=0.0),
            tl.load(cache_v + at, mask=both, other=0.0), tl.load(cache_v + half + at, mask=both, other=0.0))  # fmt: skip


@triton.jit
def _attend_block(kv, start, hi, q_lo, q_hi, scale, m, l, acc_lo, acc_hi, BLOCK_N: tl.constexpr):
    # the online softmax over one _kv_block of keys start .. (live below hi): → the updated (m, l, acc_lo, acc_hi)
    kb_lo, kb_hi, vb_lo, vb_hi = kv
    live = start + tl.arange(0, BLOCK_N) < hi
    sc = (tl.sum(kb_lo.to(tl.float32) * q_lo[None, :], axis=1) + tl.sum(kb_hi.to(tl.float32) * q_hi[None, :], axis=1)) * scale
    sc = tl.where(live, sc, float("-inf"))
    m_new = tl.maximum(m, tl.max(sc, axis=0))
    p = tl.exp(sc - m_new)
    alpha = tl.exp(m - m_new)
    l = l * alpha + tl.sum(p, axis=0)
    acc_lo = acc_lo * alpha + tl.sum(p[:, None] * vb_lo.to(tl.float32), axis=0)
    acc_hi = acc_hi * alpha + tl.sum(p[:, None] * vb_hi.to(tl.float32), axis=0)
    return m_new, l, acc_lo, acc_hi


@triton.jit
def _combine_head(pm_ptr, pl_ptr, pacc_ptr, y_ptr, h, S, DH: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr, CG: tl.constexpr):  # fmt: skip
    # y[h] = Σ_s e^(m_s − M) · acc_s / Σ_s e^(m_s − M) · l_s over head h's S partials (CG: as _gemv_input's)
    cm: tl.constexpr = ".cg" if CG else ""
    ss = tl.arange(0, BLOCK_S)
    s_ok = ss < S
    d = tl.arange(0, BLOCK_D)
    d_ok = d < DH
    # the partial sums read first: read after m's max, as they were, they waited for m's L2 round trip (SASS)
    at = (h * S + ss).to(tl.int64)[:, None] * DH + d[None, :]
    acc = tl.load(pacc_ptr + at, mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=cm)
    m = tl.load(pm_ptr + h * S + ss, mask=s_ok, other=float("-inf"), cache_modifier=cm)
    l = tl.load(pl_ptr + h * S + ss, mask=s_ok, other=0.0, cache_modifier=cm)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits (m = −inf) weigh 0; split 0 is never empty
    y = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(y_ptr + h * DH + d, y.to(y_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _attn_prefetch(cos_row, sin_row, k_ptr, v_ptr, kvh, lo, hi, stride_kh, stride_ks, DH: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # what a split over cached keys lo .. hi − 1 of kv head kvh reads before its wait (nothing of the step writes
    # it earlier): its rope row as fp32 halves (c_lo, c_hi, s_lo, s_hi), the head's cache pointers and the first
    # _kv_block → (rope, cache_k, cache_v, kv_first)
    offs = tl.arange(0, HALF)
    ok = offs < DH // 2
    half = DH // 2
    c_lo, c_hi = _load_halves(cos_row, offs, ok, half)
    s_lo, s_hi = _load_halves(sin_row, offs, ok, half)
    rope = (c_lo, c_hi, s_lo, s_hi)
    cache_k = k_ptr + kvh.to(tl.int64) * stride_kh
    cache_v = v_ptr + kvh.to(tl.int64) * stride_kh
    return rope, cache_k, cache_v, _kv_block(cache_k, cache_v, lo, hi, stride_ks, offs, ok, half, BLOCK_N)


@triton.jit
def _attn_split(
    qkv_ptr, rope, cache_k, cache_v, kv_first, pos, h, s, lo, hi, y_ptr, pm_ptr, pl_ptr, pacc_ptr,
    NQ, NKV, stride_ks, scale, S, n_heads, cnt_ptr, p_nw_ptr, p_xq_ptr, p_s_ptr, p_qs_ptr, P_K16, p_eps,
    GROUP: tl.constexpr, DH: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    FOLD: tl.constexpr, P_NORM: tl.constexpr, P_BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ON_GPU: tl.constexpr, PIPE: tl.constexpr = False,
):  # fmt: skip
    # split s of query head h after _attn_prefetch: rope of q and k, the k/v write into the cache at pos (split 0 of
    # the group's first head), then softmax(q·kᵀ · scale) · v over keys lo .. hi − 1 with an online softmax in
    # fp32; split 0 also counts the new token itself, from registers. SPLIT: the partial (max m, sum l, Σ p·v
    # [DH]) goes to pm/pl/pacc [H, S(, DH)] for _combine_head (flash-decoding); else one split covers every key and
    # y is written here. FOLD (with SPLIT): the last split of head h to finish (counter cnt_ptr[h]) combines head
    # h, and the last of the n_heads heads (counter cnt_ptr[n_heads]) packs y for the o projection (_pack_row,
    # the sub-norm with P_NORM) into p_xq / p_s / p_qs
    kvh = h // GROUP
    dt = qkv_ptr.dtype.element_ty
    offs = tl.arange(0, HALF)
    ok = offs < DH // 2
    half = DH // 2
    c_lo, c_hi, s_lo, s_hi = rope
    q_lo, q_hi = _load_halves(qkv_ptr + h * DH, offs, ok, half)
    q_lo, q_hi = _rope_half(q_lo, q_hi, c_lo, c_hi, s_lo, s_hi, dt, ON_GPU)
    kn_lo, kn_hi = _load_halves(qkv_ptr + NQ + kvh * DH, offs, ok, half)
    kn_lo, kn_hi = _rope_half(kn_lo, kn_hi, c_lo, c_hi, s_lo, s_hi, dt, ON_GPU)
    vn_lo, vn_hi = _load_halves(qkv_ptr + NQ + NKV + kvh * DH, offs, ok, half)
    first = s == 0
    if (h % GROUP == 0) & first:
        slot = pos.to(tl.int64) * stride_ks
        tl.store(cache_k + slot + offs, kn_lo.to(dt), mask=ok)
        tl.store(cache_k + slot + half + offs, kn_hi.to(dt), mask=ok)
        tl.store(cache_v + slot + offs, vn_lo.to(dt), mask=ok)
        tl.store(cache_v + slot + half + offs, vn_hi.to(dt), mask=ok)
    # split 0 starts from the new token's own score; the others from nothing (m = −inf, l = 0)
    m = tl.where(first, tl.sum(q_lo * kn_lo + q_hi * kn_hi, axis=0) * scale, float("-inf"))
    l = tl.where(first, 1.0, 0.0)
    acc_lo = tl.where(first, vn_lo, 0.0)
    acc_hi = tl.where(first, vn_hi, 0.0)
    # cached keys of this split, block by block (each block has a live key, so no NaN: an empty split skips them).
    # PIPE (chosen when a split spans several blocks): the next block is in flight during this one's math, at the
    # cost of a second block's registers; else each next block is fetched after the previous one's math. The
    # unpipelined loop stays as it was measured (the first block outside it), so that the one-block splits of
    # caches up to 1,024 slots compile to the same kernel until a GPU compares the two forms there
    if PIPE:
        kv = kv_first
        for start in range(lo, hi, BLOCK_N):
            kv_next = _kv_block(cache_k, cache_v, start + BLOCK_N, hi, stride_ks, offs, ok, half, BLOCK_N)
            m, l, acc_lo, acc_hi = _attend_block(kv, start, hi, q_lo, q_hi, scale, m, l, acc_lo, acc_hi, BLOCK_N)
            kv = kv_next
    else:
        if lo < hi:
            m, l, acc_lo, acc_hi = _attend_block(kv_first, lo, hi, q_lo, q_hi, scale, m, l, acc_lo, acc_hi, BLOCK_N)
        for start in range(lo + BLOCK_N, hi, BLOCK_N):
            kv = _kv_block(cache_k, cache_v, start, hi, stride_ks, offs, ok, half, BLOCK_N)
            m, l, acc_lo, acc_hi = _attend_block(kv, start, hi, q_lo, q_hi, scale, m, l, acc_lo, acc_hi, BLOCK_N)
    if SPLIT:
        part = h * S + s
        tl.store(pm_ptr + part, m)
        tl.store(pl_ptr + part, l)
        tl.store(pacc_ptr + part.to(tl.int64) * DH + offs, acc_lo, mask=ok)
        tl.store(pacc_ptr + part.to(tl.int64) * DH + half + offs, acc_hi, mask=ok)
        if FOLD:
            if _last_arrival(cnt_ptr + h, S):
                _combine_head(pm_ptr, pl_ptr, pacc_ptr, y_ptr, h, S, DH, BLOCK_S, BLOCK_D, True)
                if _last_arrival(cnt_ptr + n_heads, n_heads):
                    _pack_row(y_ptr, _norm_weights(p_nw_ptr, NQ, P_BLOCK_C, P_NORM), p_xq_ptr, p_s_ptr, p_qs_ptr, NQ,
                              P_K16, p_eps, False, P_NORM, False, P_BLOCK_C, ON_GPU, True)  # fmt: skip
    else:
        tl.store(y_ptr + h * DH + offs, (acc_lo / l).to(dt), mask=ok)
        tl.store(y_ptr + h * DH + half + offs, (acc_hi / l).to(dt), mask=ok)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, y_ptr, pm_ptr, pl_ptr, pacc_ptr,
    NQ, NKV, stride_kh, stride_ks, scale, CHUNK, S,
    cnt_ptr, p_nw_ptr, p_xq_ptr, p_s_ptr, p_qs_ptr, P_K16, p_eps,
    GROUP: tl.constexpr, DH: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr = False, FOLD: tl.constexpr = False, P_NORM: tl.constexpr = False,
    P_BLOCK_C: tl.constexpr = 1, BLOCK_S: tl.constexpr = 1, BLOCK_D: tl.constexpr = 1, ON_GPU: tl.constexpr = False,
    PIPE: tl.constexpr = False, pf0=None, pf1=None, pf2=None, pf3=None, pf0_n=0, pf1_n=0, pf2_n=0, pf3_n=0,
    N_PF: tl.constexpr = 0, PF_EARLY: tl.constexpr = False,
):  # fmt: skip
    # program (h, s): _attn_split of query head h (kv head h // GROUP), batch 1, one new token at position pos
    # (read from the device, so a CUDA graph replays it), keys s·CHUNK .. min((s+1)·CHUNK, pos) − 1 of the cache
    # (slot pos is the one this step writes). SPLIT: S splits a head and _attention_combine_kernel after, or with
    # FOLD the combine and the o projection's packing in this launch (FastModel(gemv="folded")); else S = 1.
    # Before the PDL wait the program reads what no kernel of this step writes before it (_attn_prefetch: pos,
    # row pos of the rope tables cos / sin [S, DH] and the first block of cached keys / values, all made by
    # kernels that completed before the previous one started): the cache's memory latency overlaps the q/k/v
    # GEMV's end, as the GEMVs' first weight tile does (at the 2B-4T shape a split is one block: 64 keys).
    h = tl.program_id(0)
    s = tl.program_id(1)
    pos = tl.load(pos_ptr)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, pos)
    rope, cache_k, cache_v, kv_first = _attn_prefetch(cos_ptr + pos * DH, sin_ptr + pos * DH, k_ptr, v_ptr, h // GROUP,
                                                      lo, hi, stride_kh, stride_ks, DH, HALF, BLOCK_N)  # fmt: skip
    if PF_EARLY:
        _prefetch_regions(pf0, pf1, pf2, pf3, pf0_n, pf1_n, pf2_n, pf3_n, N_PF, ON_GPU)
    _pdl_enter(PDL)
    _attn_split(qkv_ptr, rope, cache_k, cache_v, kv_first, pos, h, s, lo, hi, y_ptr, pm_ptr, pl_ptr, pacc_ptr, NQ, NKV,
                stride_ks, scale, S, tl.num_programs(0), cnt_ptr, p_nw_ptr, p_xq_ptr, p_s_ptr, p_qs_ptr, P_K16, p_eps,
                GROUP, DH, HALF, BLOCK_N, SPLIT, FOLD, P_NORM, P_BLOCK_C, BLOCK_S, BLOCK_D, ON_GPU, PIPE)  # fmt: skip
    if not PF_EARLY:
        _prefetch_regions(pf0, pf1, pf2, pf3, pf0_n, pf1_n, pf2_n, pf3_n, N_PF, ON_GPU)


@triton.jit
def _attention_combine_kernel(
    pm_ptr, pl_ptr, pacc_ptr, y_ptr, S,
    DH: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # one program per query head: _combine_head
    _pdl_enter(PDL)
    _combine_head(pm_ptr, pl_ptr, pacc_ptr, y_ptr, tl.program_id(0), S, DH, BLOCK_S, BLOCK_D, False)


@triton.jit
def _argmax_kernel(x_ptr, N, pv_ptr, pi_ptr, cnt_ptr, out_ptr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                   PDL: tl.constexpr = False):  # fmt: skip
    # argmax of x [N] in one launch: program p writes its block's (max, first index of it) to pv / pi [P], and the
    # last program to finish (_last_arrival) reduces the P partials into out int64 [1]. Ties go to the lowest
    # index at both levels, as torch.argmax; NaN is not handled as torch does (it treats NaN as the maximum).
    _pdl_enter(PDL)
    p = tl.program_id(0)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
    best, at = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(pv_ptr + p, best)
    tl.store(pi_ptr + p, p * BLOCK + at)
    n_prog = tl.num_programs(0)
    if _last_arrival(cnt_ptr, n_prog):
        j = tl.arange(0, BLOCK_P)
        pv = tl.load(pv_ptr + j, mask=j < n_prog, other=float("-inf"), cache_modifier=".cg")
        _, jb = tl.max(pv, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr, tl.load(pi_ptr + jb, cache_modifier=".cg").to(tl.int64))


# a padding key for _sample_kernel: int64's minimum, below every real (value, id) key
_NO_KEY = tl.constexpr(-9223372036854775808)


@triton.jit
def _ordered(y):
    # fp32 → int32 that orders as the floats do: the bits, with a negative float's magnitude bits flipped.
    # -0.0 becomes +0.0's 0, as they compare equal (in integers: a float y + 0.0 may be folded away)
    b = y.to(tl.int32, bitcast=True)
    b = tl.where((b & 0x7FFFFFFF) == 0, 0, b)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _ordered_value(o):
    # the fp32 of an _ordered int32
    return tl.where(o >= 0, o, o ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _sort_key(y, ids):
    # fp32 values and int32 ids → int64 keys that order as value descending, then id ascending: _ordered(y) in
    # the high half, 2^32 - 1 - id in the low half
    return (_ordered(y).to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _key_value(key):
    # the fp32 value of a _sort_key
    return _ordered_value((key >> 32).to(tl.int32))


@triton.jit
def _key_id(key):
    # the id (int64) of a _sort_key
    return 4294967295 - (key & 4294967295)


@triton.jit
def _div_rn(a, b, ON_GPU: tl.constexpr):
    # a / b rounded to nearest, as torch divides (Triton's own fp32 division may be approximate)
    if ON_GPU:
        return libdevice.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _exp(x, ON_GPU: tl.constexpr):
    # expf as torch's CUDA kernels compute it (libdevice's), not tl.exp's faster approximation
    if ON_GPU:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _log(x, ON_GPU: tl.constexpr):
    # logf as torch's CUDA kernels compute it (libdevice's)
    if ON_GPU:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def _scaled(x_ptr, offs, N, t, ON_GPU: tl.constexpr):
    # logits / temperature at offs (0 past N)
    return _div_rn(tl.load(x_ptr + offs, mask=offs < N, other=0.0).to(tl.float32), t, ON_GPU)


@triton.jit
def _stream(rng_ptr):
    # the sampling stream rng (seed, draws), int64 [2]: (draws, the Philox key of this draw: the draw number in
    # the high 32 bits, the seed's low 32 bits below); tl.rand(key, id) is then token id's number for this draw
    draw = tl.load(rng_ptr + 1)
    return draw, (draw << 32) | (tl.load(rng_ptr) & 4294967295)


@triton.jit
def _race(e, u, ON_GPU: tl.constexpr):
    # the exponential race's entries e / E, E = -log(U) ~ Exp(1): the largest is a draw in proportion to e
    return _div_rn(e, -_log(u, ON_GPU), ON_GPU)


@triton.jit
def _race_walk(x_ptr, N, t, m, c, r0, r1, min_p, seed, best, win, BLOCK: tl.constexpr, USE_MIN_P: tl.constexpr,
               ON_GPU: tl.constexpr):  # fmt: skip
    # one walk over the logits, racing (best, win: the race's leader so far) the tokens at _ordered value c
    # whose rank among those ties (by id) is in [r0, r1); with min-p only those with e ≥ min_p. Returns the new
    # (best, win) and how many tokens raced.
    seen = 0  # ties at c before this block
    n = 0
    for b0 in range(0, N, BLOCK):
        o = b0 + tl.arange(0, BLOCK)
        y = _scaled(x_ptr, o, N, t, ON_GPU)
        key = _ordered(y).to(tl.int64)
        tie = (o < N) & (key == c)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        want = tie & (rank >= r0) & (rank < r1)
        e = _exp(y - m, ON_GPU)
        if USE_MIN_P:
            want = want & (e >= min_p)
        r = tl.where(want, _race(e, tl.rand(seed, o), ON_GPU), -1.0)
        b2, a2 = tl.max(r, axis=0, return_indices=True, return_indices_tie_break_left=True)
        win = tl.where(b2 > best, (b0 + a2).to(tl.int64), win)
        best = tl.maximum(best, b2)
        seen += tl.sum(tie.to(tl.int32), axis=0)
        n += tl.sum(want.to(tl.int32), axis=0)
    return best, win, n


@triton.jit
def _sample_kernel(
    x_ptr, N, K, temp_ptr, top_p_ptr, min_p_ptr, rng_ptr, pk_ptr, po_ptr, cnt_ptr, out_ptr, KP: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, USE_TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr,
    ON_GPU: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # One draw from logits x [N] / temperature through top-k, then top-p and min-p (runtime/sampling.py's
    # filters), in one launch. The order is value descending, then id ascending (_sort_key). Program p keeps the
    # first KP ≥ K keys of its block in pk [P, KP]; the last program to arrive merges the lists into the first KP
    # keys of the whole order, g, and races the kept ones among them. Only ties at the k-th logit can be kept
    # past g (when more than KP - K + 1 tokens tie there): po [P] holds how many of each block's values tie with
    # its list's last one but fell off it, and a walk over x races those that stay.
    _pdl_enter(PDL)
    p = tl.program_id(0)
    t = tl.load(temp_ptr)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    y = _scaled(x_ptr, offs, N, t, ON_GPU)
    top = tl.topk(tl.where(ok, _sort_key(y, offs), _NO_KEY), KP)  # [KP] sorted, first first
    tl.store(pk_ptr + p * KP + tl.arange(0, KP), top)
    # A list holds every value of its block above the k-th logit (fewer than K ≤ KP tokens are above it), so
    # only ties with its last value can be missing from it. With padding in it, nothing is.
    last = tl.min(top, axis=0)
    last_v = _key_value(last)
    over = tl.sum((ok & (y == last_v)).to(tl.int32), axis=0)
    over -= tl.sum(((top != _NO_KEY) & (_key_value(top) == last_v)).to(tl.int32), axis=0)
    tl.store(po_ptr + p, tl.where(last != _NO_KEY, over, 0))
    n_prog = tl.num_programs(0)
    if _last_arrival(cnt_ptr, n_prog):
        j = tl.arange(0, BLOCK_P * KP)
        lists = tl.load(pk_ptr + j, mask=j < n_prog * KP, other=_NO_KEY, cache_modifier=".cg")
        g = tl.topk(lists, KP)  # [KP] the first KP tokens of the whole order
        gv = _key_value(g)
        gid = _key_id(g)
        real = g != _NO_KEY
        i = tl.arange(0, KP)
        m = tl.max(tl.where(i == 0, gv, float("-inf")), axis=0)  # the top logit
        q = tl.arange(0, BLOCK_P)
        # U: Philox keyed by the stream (a 32-bit seed and the draw's number), its counter the token id, so a
        # token's U does not depend on where it is found
        draw, seed = _stream(rng_ptr)
        kth = tl.max(tl.where(i == K - 1, gv, float("-inf")), axis=0)
        # every token at the k-th logit: those in the lists, and those that fell off a list ending at it
        ends = tl.load(pk_ptr + q * KP + KP - 1, mask=q < n_prog, other=_NO_KEY, cache_modifier=".cg")
        fell = tl.load(po_ptr + q, mask=q < n_prog, other=0, cache_modifier=".cg")
        n_kth = tl.sum(((lists != _NO_KEY) & (_key_value(lists) == kth)).to(tl.int32), axis=0)
        n_kth += tl.sum(tl.where((ends != _NO_KEY) & (_key_value(ends) == kth), fell, 0), axis=0)
        surv = real & (gv >= kth)  # top-k's survivors in g
        in_g = tl.sum((surv & (gv == kth)).to(tl.int32), axis=0)  # the lowest ids of the ties at the k-th
        past = (n_kth - in_g).to(tl.float32)  # survivors past g, all at the k-th logit
        e = tl.where(surv, _exp(gv - m, ON_GPU), 0.0)  # [KP] unnormalised probabilities
        e_k = _exp(kth - m, ON_GPU)
        keep = surv
        more = past  # how many of the survivors past g stay
        if USE_TOP_P:  # keep each token whose higher-ranked mass is below top_p of the survivors' total
            top_p = tl.load(top_p_ptr)
            cum = tl.cumsum(e, axis=0)
            total = tl.max(cum, axis=0)
            z = total + past * e_k
            keep = surv & (cum - e < top_p * z)
            every = tl.sum(keep.to(tl.int32), axis=0) == tl.sum(surv.to(tl.int32), axis=0)
            # past g: the first u ties stay, u = ceil((top_p·z - total) / e_k), at most ``past``
            u = tl.minimum(tl.maximum(tl.ceil(_div_rn(top_p * z - total, e_k, ON_GPU)), 0.0), past)
            more = tl.where(every & (e_k > 0), u, 0.0)
        min_p = tl.load(min_p_ptr)
        if USE_MIN_P:  # keep p ≥ min_p · p_max, i.e. e ≥ min_p (the top token has e = 1)
            keep = keep & (e >= min_p)
            more = tl.where(e_k >= min_p, more, 0.0)
        # the race over the kept tokens of g
        race = tl.where(keep, _race(e, tl.rand(seed, gid.to(tl.int32)), ON_GPU), -1.0)
        best, at = tl.max(race, axis=0, return_indices=True, return_indices_tie_break_left=True)
        win = tl.max(tl.where(i == at, gid, -1), axis=0)
        n_kept = tl.sum(keep.to(tl.int32), axis=0)
        if more > 0:  # kept ties at the k-th past g: ranks in_g .. in_g + more - 1 among those ties
            best, win, n_past = _race_walk(x_ptr, N, t, m, _ordered(kth).to(tl.int64), in_g, in_g + more.to(tl.int32),
                                           min_p, seed, best, win, BLOCK, USE_MIN_P, ON_GPU)  # fmt: skip
            n_kept += n_past
        tl.store(out_ptr, win)
        tl.store(out_ptr + 1, n_kept.to(tl.int64))
        tl.store(rng_ptr + 1, draw + 1)


# the no-top-k draw's keys (_nucleus_level_kernel): a scaled logit's _ordered bits plus 2^31, so that the keys
# 0 .. 2^32 − 1 (int64) order as the values do and their bits read as unsigned digits
_KEY_BIAS = tl.constexpr(2147483648)


@triton.jit
def _nucleus_key(y):
    # fp32 values → int64 keys in [0, 2^32) that order as the values (-0.0 and 0.0 one key)
    return _ordered(y).to(tl.int64) + _KEY_BIAS


@triton.jit
def _nucleus_level_kernel(
    x_ptr, N, temp_ptr, top_p_ptr, sf_ptr, st_ptr, pmax_ptr, pm_ptr, pc_ptr, cnt_ptr,
    LEVEL: tl.constexpr, BITS: tl.constexpr, TOP_P: tl.constexpr, BLOCK: tl.constexpr, CH: tl.constexpr,
    BLOCK_P: tl.constexpr, ON_GPU: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # One launch of the top-p cut's radix select (``sample`` without a top-k): level LEVEL of 32 / BITS over the
    # keys of y = x / temperature (_nucleus_key). The top-p cut is the highest key c whose tokens at or above it
    # hold top_p of the mass Z = Σ e, e = exp(y − m): every token above c stays, and the first u of those at c
    # (by id). Level L finds c's L-th digit of BITS bits: each program sums the mass e of its block's keys that
    # carry the digits found so far (st[0]), in NB = 2^BITS bins by their next digit, into pm [P, NB] (at the
    # last level also the counts, pc [P, NB]); the last program to arrive (_last_arrival) sums the bins in
    # program order (so a replay gives the same sums) and takes the highest bin whose mass with all above it
    # (sf[2]) reaches the target top_p · Z (sf[1]): the digit; then sf[2] becomes the mass above that bin. Level 0
    # also finds m (sf[0]): each program's bins hold exp(y − its own max), rescaled by the last program. After
    # the last level st[0] is c, st[1] is u and st[2] c's bin. TOP_P off: level 0 finds m only (min-p or the
    # temperature alone). sf f32 [3], st int64 [3], pmax f32 [P]; cnt the int32 counter (zero, left zero).
    NB: tl.constexpr = 1 << BITS
    LAST: tl.constexpr = LEVEL == 32 // BITS - 1
    SHIFT: tl.constexpr = 32 - BITS * (LEVEL + 1)  # the digit's lowest bit
    _pdl_enter(PDL)
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    t = tl.load(temp_ptr)
    bins = tl.arange(0, NB)
    if LEVEL == 0:
        offs = p * BLOCK + tl.arange(0, BLOCK)
        m = tl.max(tl.where(offs < N, _scaled(x_ptr, offs, N, t, ON_GPU), float("-inf")), axis=0)
        tl.store(pmax_ptr + p, m)
        m = tl.where(m == float("-inf"), 0.0, m)  # a block of -inf only: its e are 0, not NaN
        prefix = tl.zeros((), dtype=tl.int64)
    else:
        m = tl.load(sf_ptr)
        prefix = tl.load(st_ptr)
    if TOP_P:
        # the bins of CH keys at a time, as [CH, NB] sums (one select and one add a key and bin; summed over
        # the CH rows once, at the end)
        mass = tl.zeros((CH, NB), dtype=tl.float32)
        count = tl.zeros((CH, NB), dtype=tl.int32)
        for c in tl.static_range(BLOCK // CH):
            offs = p * BLOCK + c * CH + tl.arange(0, CH)
            y = _scaled(x_ptr, offs, N, t, ON_GPU)
            key = _nucleus_key(y)
            ok = offs < N
            if LEVEL > 0:
                ok = ok & ((key >> (SHIFT + BITS)) == prefix)
            hit = (((key >> SHIFT) & (NB - 1)).to(tl.int32)[:, None] == bins[None, :]) & ok[:, None]
            mass += tl.where(hit, _exp(y - m, ON_GPU)[:, None], 0.0)
            if LAST:
                count += hit.to(tl.int32)
        tl.store(pm_ptr + p * NB + bins, tl.sum(mass, axis=0))
        if LAST:
            tl.store(pc_ptr + p * NB + bins, tl.sum(count, axis=0))
    if _last_arrival(cnt_ptr, n_prog):
        j = tl.arange(0, BLOCK_P)
        j_ok = j < n_prog
        if LEVEL == 0:
            pmax = tl.load(pmax_ptr + j, mask=j_ok, other=float("-inf"), cache_modifier=".cg")
            m = tl.max(pmax, axis=0)
            tl.store(sf_ptr, m)
        if TOP_P:
            pm = tl.load(pm_ptr + j[:, None] * NB + bins[None, :], mask=j_ok[:, None], other=0.0, cache_modifier=".cg")
            if LEVEL == 0:  # each program's exp(y − m_p) → exp(y − m); a program of -inf only (or none) adds 0
                pm = pm * tl.where(pmax == float("-inf"), 0.0, _exp(pmax - m, ON_GPU))[:, None]
                target = tl.load(top_p_ptr) * tl.sum(tl.sum(pm, axis=1), axis=0)
                tl.store(sf_ptr + 1, target)
                above = 0.0
            else:
                target = tl.load(sf_ptr + 1)
                above = tl.load(sf_ptr + 2)
            mb = tl.sum(pm, axis=0)  # [NB] the bins' mass
            reach = above + tl.cumsum(mb, axis=0, reverse=True)  # [NB] the mass at or above each bin
            b = tl.max(tl.where(reach >= target, bins, -1), axis=0)
            # none reaches it only where rounding left this range's mass short of what the level above summed:
            # then everything in the range stays, so the cut is its lowest bin with mass
            b = tl.where(b >= 0, b, tl.min(tl.where(mb > 0, bins, NB - 1), axis=0))
            above += tl.sum(tl.where(bins > b, mb, 0.0), axis=0)
            prefix = (prefix << BITS) | b.to(tl.int64)
            tl.store(sf_ptr + 2, above)
            tl.store(st_ptr, prefix)
            if LAST:
                pc = tl.load(pc_ptr + j[:, None] * NB + bins[None, :], mask=j_ok[:, None], other=0, cache_modifier=".cg")
                ties = tl.sum(tl.sum(tl.where(bins[None, :] == b, pc, 0), axis=1), axis=0)  # tokens at c
                e_c = _exp(_ordered_value((prefix - _KEY_BIAS).to(tl.int32)) - m, ON_GPU)
                # the ties stay while the mass above each is below the target: the first u, 1 ≤ u ≤ ties
                u = tl.ceil(_div_rn(target - above, e_c, ON_GPU))
                u = tl.minimum(tl.maximum(u, 1.0), ties.to(tl.float32))
                tl.store(st_ptr + 1, u.to(tl.int64))
                tl.store(st_ptr + 2, b.to(tl.int64))


@triton.jit
def _nucleus_race_kernel(
    x_ptr, N, temp_ptr, min_p_ptr, rng_ptr, sf_ptr, st_ptr, pc_ptr, pv_ptr, pi_ptr, pn_ptr, cnt_ptr, out_ptr,
    BITS: tl.constexpr, TOP_P: tl.constexpr, USE_MIN_P: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
    ON_GPU: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    # The draw after _nucleus_level_kernel's levels: each program races (e / -log U, as _sample_kernel) the tokens
    # of its block that the top-p cut keeps (keys above c, and ties at c ranked by id below u: the ties in the
    # programs before come from the last level's counts), and with min-p those with e ≥ min_p; it writes its
    # leader (pv, pi) and how many it kept (pn). The last program to arrive takes the leader of the leaders (the
    # lower id on a tie, as torch.argmax), writes out = (id, kept) and advances the stream's draw count.
    NB: tl.constexpr = 1 << BITS
    _pdl_enter(PDL)
    p = tl.program_id(0)
    n_prog = tl.num_programs(0)
    t = tl.load(temp_ptr)
    m = tl.load(sf_ptr)
    offs = p * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    y = _scaled(x_ptr, offs, N, t, ON_GPU)
    e = _exp(y - m, ON_GPU)
    keep = ok
    if TOP_P:
        cut = tl.load(st_ptr)
        u = tl.load(st_ptr + 1)
        j = tl.arange(0, BLOCK_P)
        before = tl.sum(tl.load(pc_ptr + j * NB + tl.load(st_ptr + 2), mask=j < p, other=0, cache_modifier=".cg"), axis=0)
        key = _nucleus_key(y)
        tie = ok & (key == cut)
        rank = before + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        keep = ok & ((key > cut) | (tie & (rank < u)))
    if USE_MIN_P:  # keep p ≥ min_p · p_max, i.e. e ≥ min_p (the top token has e = 1)
        keep = keep & (e >= tl.load(min_p_ptr))
    draw, seed = _stream(rng_ptr)
    race = tl.where(keep, _race(e, tl.rand(seed, offs), ON_GPU), -1.0)
    best, at = tl.max(race, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(pv_ptr + p, best)
    tl.store(pi_ptr + p, (p * BLOCK + at).to(tl.int64))
    tl.store(pn_ptr + p, tl.sum(keep.to(tl.int32), axis=0))
    if _last_arrival(cnt_ptr, n_prog):
        j = tl.arange(0, BLOCK_P)
        pv = tl.load(pv_ptr + j, mask=j < n_prog, other=-2.0, cache_modifier=".cg")
        _, jb = tl.max(pv, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr, tl.load(pi_ptr + jb, cache_modifier=".cg"))
        tl.store(out_ptr + 1, tl.sum(tl.load(pn_ptr + j, mask=j < n_prog, other=0, cache_modifier=".cg"), axis=0).to(tl.int64))
        tl.store(rng_ptr + 1, draw + 1)


@triton.jit
def _advance_kernel(nxt_ptr, out_ptr, n_ptr, tok_ptr, pos_ptr, S, PDL: tl.constexpr = False):
    # one program: the decode state after a step's pick (int64 scalars): out[n] = tok = nxt (no write at n ≥ S),
    # pos += 1, n += 1
    _pdl_enter(PDL)
    nxt = tl.load(nxt_ptr)
    n = tl.load(n_ptr)
    tl.store(out_ptr + n, nxt, mask=n < S)
    tl.store(tok_ptr, nxt)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)
    tl.store(n_ptr, n + 1)


# --------------------------------------------------------------------------------------------------------------
# launch configurations
#
# On a GPU the GEMVs and the matmul autotune over a small set, keyed by shape (the first call of a shape pays
# for it: warm up before capturing a CUDA graph). Under the interpreter one small fixed config keeps the tests
# fast while still running several K iterations and partial tiles.

_GEMV_CONFIGS = [  # BLOCK_N rows, BLOCK_W int32 words, warps
    (4, 64, 2), (4, 128, 4), (8, 64, 4), (8, 128, 4), (16, 64, 4), (16, 128, 4), (16, 128, 8), (32, 64, 4), (32, 128, 8)
]  # fmt: skip
# the packed GEMV's lean loop affords taller tiles (_PACKED_EXTRA: fewer, fuller programs) and tiles as wide as a
# whole row (_PACKED_WIDE; 2B-4T: 160 words at K = 2,560, 432 at 6,912), so that a program issues all its weight
# loads at once and waits on memory once: at decode sizes each K iteration is a memory latency it cannot hide
_PACKED_EXTRA = [(64, 64, 4), (64, 128, 8), (16, 32, 4), (32, 32, 4), (8, 32, 2)]
_PACKED_WIDE = [(4, 256, 4), (8, 256, 4), (16, 256, 8), (4, 512, 8), (8, 512, 8)]
PACKED_GEMV_CONFIGS = _GEMV_CONFIGS + _PACKED_EXTRA + _PACKED_WIDE  # what the packed GEMV autotunes over
_MM_CONFIGS = [(128, 128, 128, 8, 3), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (64, 64, 128, 4, 4), (128, 256, 64, 8, 3)]
_INTERP_GEMV = (16, 16, 1)  # BLOCK_N, BLOCK_W, warps
_INTERP_MM = (16, 32, 64, 1, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
# BITNET158_AUTOTUNE=0 on a GPU: one fixed config per kernel instead of the autotuner, so that a first call
# compiles one kernel, not every config (GPU tests under a short time budget: on an H200 the autotuner's
# compilation alone outlasted a 40 s test budget). Correct either way; only the tuned configs are fast.
_TUNE = not _INTERPRET and os.environ.get("BITNET158_AUTOTUNE", "1") != "0"
FIXED_GEMV = _INTERP_GEMV if _INTERPRET else (16, 128, 4)
_FIXED_MM = _INTERP_MM if _INTERPRET else _MM_CONFIGS[0]


def autotuning() -> bool:
    """Whether launch configs are tuned here (a GPU without BITNET158_AUTOTUNE=0) rather than fixed."""
    return _TUNE


_gemv_w2a8_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w) for bn, bw, w in _GEMV_CONFIGS],
    key=["N", "K16"],
)(_gemv_w2a8_kernel)


def _prune_folded(configs: list, named_args: dict, **kwargs) -> list:
    # the folded tail (PACK) holds a whole row on the program's threads: at 2 warps the gate|up tail takes 244
    # registers a thread (benchmarks/kernel_resources.py), so those tiles are not worth compiling there
    return [c for c in configs if c.num_warps >= 4] if kwargs.get("PACK") else configs


_gemv_packed_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w) for bn, bw, w in PACKED_GEMV_CONFIGS],
    key=["N", "K16", "HAS_RES", "PACK"],
    prune_configs_by={"early_config_prune": _prune_folded},
)(_gemv_packed_kernel)
_gemv_w8a8_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w) for bn, bw, w in _GEMV_CONFIGS], key=["N", "K4", "NORM"]
)(_gemv_w8a8_kernel)
_mm_w2a8_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in _MM_CONFIGS
    ],
    key=["M_BUCKET", "N", "K"],
)(_mm_w2a8_kernel)


# --------------------------------------------------------------------------------------------------------------
# wrappers


def _check_x(x: torch.Tensor, K: int, what: str) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != K:
        raise KernelShapeError(f"{what}: x must be [M, {K}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise KernelShapeError(f"{what}: x must be a float tensor, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def _check_weight(packed: torch.Tensor, scale: torch.Tensor, K: int, x: torch.Tensor, what: str) -> None:
    kb = (K + 3) // 4
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != kb or packed.stride(1) != 1:
        raise KernelShapeError(f"{what}: packed must be uint8 [N, {kb}] with unit stride, got {packed.dtype} {tuple(packed.shape)}")
    n = packed.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) not in ((1,), (n,)):
        raise KernelShapeError(f"{what}: scale must be f32 [1] or [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if not (packed.device == scale.device == x.device):
        raise KernelShapeError(f"{what}: x, packed and scale must be on one device, got {x.device}, {packed.device}, {scale.device}")


def _check_act(act: str | None, what: str) -> None:
    if act not in (None, "relu2", "silu"):
        raise KernelShapeError(f"{what}: act must be None, 'relu2' or 'silu', got {act!r}")


def _check_norm(norm: torch.Tensor | None, K: int, x: torch.Tensor, what: str) -> None:
    if norm is not None and (norm.shape != (K,) or norm.device != x.device):
        raise KernelShapeError(f"{what}: norm weight must be [{K}] on {x.device}, got {tuple(norm.shape)}")


def _check_residual(residual: torch.Tensor | None, m: int, n: int, dtype: torch.dtype, device, what: str) -> None:
    if residual is not None and (
        residual.shape != (m, n) or residual.dtype != dtype or residual.stride(1) != 1 or residual.device != device
    ):
        raise KernelShapeError(f"{what}: residual must be {dtype} [{m}, {n}] with unit stride, got "
                               f"{residual.dtype} {tuple(residual.shape)}")  # fmt: skip


# FastModel(pdl=...) and the kernels' pdl: off; on; on with the early trigger in every kernel; on with the early
# trigger only in the kernels that read no weights, each pack_act and the attention's combine (light=True below)
PDL_MODES = (False, True, "early", "early-packs")


def _pdl(t: torch.Tensor, pdl: bool | str, light: bool = False) -> dict:
    # the launch flags of programmatic dependent launch where asked for and available (a CUDA sm_90+ device,
    # triton with gdc_*): PDL 0, 1 or 2 (the early trigger: pdl="early", or "early-packs" at a light launch) for
    # _pdl_enter, and launch_pdl. An optimization only, so elsewhere the kernel launches normally. "early-packs"
    # bounds how far the launches run ahead: a pack lets the GEMV after it launch at once, so that GEMV is resident
    # with its weights in flight while the GEMV before the pack still runs; but that GEMV lets the next pack launch
    # only after its own wait, so no kernel gets further ahead than that
    if pdl not in PDL_MODES:
        raise KernelShapeError(f"pdl must be one of {PDL_MODES}, got {pdl!r}")
    on = bool(pdl) and not _INTERPRET and gdc_wait is not None and t.is_cuda and _sm90(t.device.index)
    early = pdl == "early" or pdl == "early-packs" and light
    mode = (2 if early else 1) if on else 0
    return {"PDL": mode, "launch_pdl": mode > 0}


@functools.cache
def _sm90(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def prologue_block(K: int) -> int:
    """The GEMVs' input-statistics chunk for K inputs (the plain GEMV's max|x|, the int8 head's norm and max): the
    whole row up to 4,096 values, so that each pass of the prologue waits on memory once at K = 2,560 and twice at
    6,912; no tile spills with it (benchmarks/kernel_resources.py)."""
    return min(triton.next_power_of_2(K), 4096)


def gemv_compatible(packed: torch.Tensor) -> bool:
    """True when the t2 rows can be read as int32 words: row bytes a multiple of 4 and a 4-byte aligned base."""
    return packed.shape[1] % 4 == 0 and packed.data_ptr() % 4 == 0 and packed.stride(0) % 4 == 0


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 absmax quantization: x [M, K] float → (q int8 [M, K], s f32 [M]), bit-exact with BitLinear's."""
    if x.dim() != 2 or not x.is_floating_point():
        raise KernelShapeError(f"quantize_act: x must be a float [M, K] tensor, got {x.dtype} {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 64 if _INTERPRET else 4096)
        _quant_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, ON_GPU=not _INTERPRET, num_warps=4)
    return q, s


def bitlinear_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    K: int,
    config: tuple[int, int, int] | None = None,
    *,
    pdl: bool | str = False,
) -> torch.Tensor:
    """Decode W2A8 GEMV with fused activation quantization: x [M, K] float → y [M, N] in x's dtype.

    ``packed`` uint8 [N, ceil(K/4)] (t2), its row bytes a multiple of 4 (``gemv_compatible``); ``scale`` f32 [1]
    or [N]. ``config`` = (BLOCK_N, BLOCK_W words, num_warps) bypasses the autotuner (benchmarks, tests).

    ``pdl``: launch with programmatic dependent launch (sm_90+; ignored elsewhere), so that the launch overlaps
    the previous kernel's end ("early": the next launch may also start before this one's wait, ``_pdl_enter``;
    "early-packs" is True here: a GEMV reads weights);
    every kernel launched so in a sequence must be one of this module's.
    """
    x = _check_x(x, K, "bitlinear_gemv")
    _check_weight(packed, scale, K, x, "bitlinear_gemv")
    if not gemv_compatible(packed):
        raise KernelShapeError(f"bitlinear_gemv: row bytes {packed.shape[1]} must be a multiple of 4 (use bitlinear_matmul)")
    m, n = x.shape[0], packed.shape[0]
    words = packed.view(torch.int32)  # [N, K16]: little-endian, weight 16w + k in bits 2k..2k+1 of word w
    k16 = words.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args = (x, words, scale, y, n, K, k16, x.stride(0), words.stride(0), y.stride(0))
    flags = dict(SCALE_PER_ROW=scale.numel() != 1 or n == 1, BLOCK_P=prologue_block(K), **_pdl(x, pdl))
    if config is None and _TUNE:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)
        _gemv_w2a8_tuned[grid](*args, **flags, ON_GPU=True)
    else:
        bn, bw, warps = config or FIXED_GEMV
        _gemv_w2a8_kernel[(triton.cdiv(n, bn), m)](
            *args, **flags, BLOCK_N=bn, BLOCK_W=bw, ON_GPU=not _INTERPRET, num_warps=warps
        )
    return y


def pack_act_launch(k16: int, act: bool) -> tuple[int, int]:
    """(BLOCK_C, num_warps) of _pack_act_kernel for K16 word columns: the whole row at once (16·BLOCK_C values,
    twice that with act), about 32 values per thread and tensor."""
    block_c = triton.next_power_of_2(k16)
    return block_c, max(4, min(16, block_c * (32 if act else 16) // 1024))


# the warps GraphDecoder.search_tiles tries for each site's pack_act. Why search them: a pack is one program on one
# multiprocessor, a chain of dependent instructions that more warps shorten and interleave (at K = 2,560 a thread
# issues 856 SASS instructions with 4 warps, 552 with 8, 408 with 16: benchmarks/kernel_resources.py), while
# their cross-warp reductions grow; only the step's time says which wins
PACK_WARPS = (4, 8, 16)


class PackedAct(NamedTuple):
    """A GEMV input quantized and packed once (``pack_act``): xq int32 [M, 4, K16], s f32 [M], qsum int32 [M]."""

    xq: torch.Tensor
    s: torch.Tensor
    qsum: torch.Tensor
    K: int

    @classmethod
    def empty(cls, m: int, K: int, device) -> PackedAct:
        """Uninitialised buffers for m rows of K inputs (what pack_act or a folded producer fills)."""
        k16 = (K + 15) // 16
        return cls(torch.empty((m, 4, k16), dtype=torch.int32, device=device),
                   torch.empty((m,), dtype=torch.float32, device=device),
                   torch.empty((m,), dtype=torch.int32, device=device), K)  # fmt: skip


def pack_act(
    x: torch.Tensor,
    K: int,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    act: str | None = None,
    pdl: bool | str = False,
    warps: int | None = None,
) -> PackedAct:
    """Quantize a GEMV input once for ``bitlinear_gemv_packed``: x [M, K] float (gate | up [M, 2K] with
    ``act``), with ``norm`` / ``act`` / ``pdl`` as in ``bitlinear_gemv`` (but "early-packs" is "early" here: a
    pack reads no weights). One program per row (decode), of ``warps`` warps (a power of two up to 32; None:
    pack_act_launch's). The warps set the order of the fp32 sum of squares (the norm's 1/rms), so another count
    may change it in its last bit, and so a rounding of q."""
    _check_act(act, "pack_act")
    if warps is not None and (not isinstance(warps, int) or warps < 1 or warps > 32 or warps & (warps - 1)):
        raise KernelShapeError(f"pack_act: warps must be a power of two in 1..32, got {warps!r}")
    x = _check_x(x, 2 * K if act else K, "pack_act")
    _check_norm(norm, K, x, "pack_act")
    m = x.shape[0]
    out = PackedAct.empty(m, K, x.device)
    if m:
        k16 = out.xq.shape[2]
        block_c, default_warps = pack_act_launch(k16, act is not None)
        warps = warps or default_warps
        _pack_act_kernel[(m,)](
            x, norm if norm is not None else x, out.xq, out.s, out.qsum, K, k16, eps, x.stride(0), out.xq.stride(0),
            ACT=act is not None, NORM=norm is not None, RELU2=act == "relu2", BLOCK_C=block_c,
            ON_GPU=not _INTERPRET, **_pdl(x, pdl, light=True), num_warps=warps,
        )  # fmt: skip
    return out


class NextPack(NamedTuple):
    """What a producer kernel's last program packs for the next GEMV (FastModel(gemv="folded")): ``pack_act`` of
    the producer's output with these options, and the int32 counter the producer's programs arrive on (zero before
    the launch, left zero after it, so a CUDA graph replays it; one counter per row, or per head plus one for
    ``decode_attention``). Counters must not be shared by launches that can run at the same time."""

    counter: torch.Tensor
    norm: torch.Tensor | None = None
    eps: float = 0.0
    act: str | None = None


def _check_counter(c: torch.Tensor, n: int, device: torch.device, what: str) -> None:
    # the atomic counters of the kernels that arrive on them (_last_arrival): int32 [≥ n], contiguous, on device
    if c.dtype != torch.int32 or c.dim() != 1 or c.numel() < n or c.device != device or c.stride(0) != 1:
        raise KernelShapeError(f"{what}: the counter must be int32 [≥ {n}] on {device}, got {c.dtype} {tuple(c.shape)}")


def _next_pack(nxt: NextPack, m: int, k: int, n_counters: int, y: torch.Tensor, what: str) -> tuple[PackedAct, dict]:
    # the PackedAct a folded producer fills for K = k inputs of y's rows, and the kernel arguments that say so
    _check_act(nxt.act, what)
    _check_norm(nxt.norm, k, y, what)
    c = nxt.counter
    _check_counter(c, n_counters, y.device, what)
    out = PackedAct.empty(m, k, y.device)
    k16 = out.xq.shape[2]
    return out, dict(
        cnt_ptr=c, p_nw_ptr=nxt.norm if nxt.norm is not None else y, p_xq_ptr=out.xq, p_s_ptr=out.s, p_qs_ptr=out.qsum,
        P_K=k, P_K16=k16, p_eps=nxt.eps, p_stride_xq=out.xq.stride(0), P_ACT=nxt.act is not None,
        P_NORM=nxt.norm is not None, P_RELU2=nxt.act == "relu2", P_BLOCK_C=pack_act_launch(k16, nxt.act is not None)[0],
    )  # fmt: skip


def _no_pack(y: torch.Tensor) -> dict:
    # the folded producers' pack arguments when they do not pack (PACK / FOLD off: never read)
    return dict(cnt_ptr=y, p_nw_ptr=y, p_xq_ptr=y, p_s_ptr=y, p_qs_ptr=y, P_K=1, P_K16=1, p_eps=0.0, p_stride_xq=0)


def bitlinear_gemv_packed(
    a: PackedAct,
    packed: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
    pdl: bool | str = False,
    pack_next: NextPack | None = None,
) -> torch.Tensor | tuple[torch.Tensor, PackedAct]:
    """The decode GEMV on a ``pack_act`` input: → y [M, N] in ``dtype`` (residual + y with ``residual`` [M, N]),
    equal to ``bitlinear_gemv`` on the same input. ``packed`` and ``pdl`` as for ``bitlinear_gemv``.

    ``pack_next`` (counter int32 [≥ M]): also returns ``pack_act(y, …)`` with its options (K = N, or N / 2 with
    ``act``), made by the last program of each row in the same launch: (y, PackedAct)."""
    m, k16 = a.xq.shape[0], a.xq.shape[2]
    _check_weight(packed, scale, a.K, a.xq, "bitlinear_gemv_packed")
    if not gemv_compatible(packed) or packed.shape[1] != 4 * k16:
        raise KernelShapeError(f"bitlinear_gemv_packed: row bytes {packed.shape[1]} must be {4 * k16} (whole words)")
    n = packed.shape[0]
    _check_residual(residual, m, n, dtype, a.xq.device, "bitlinear_gemv_packed")
    words = packed.view(torch.int32)  # [N, K16]
    y = torch.empty((m, n), dtype=dtype, device=a.xq.device)
    nxt = None
    if pack_next is not None:
        if pack_next.act is not None and n % 2:
            raise KernelShapeError(f"bitlinear_gemv_packed: pack_next with act needs gate | up rows, got N = {n}")
        nxt, tail = _next_pack(pack_next, m, n // 2 if pack_next.act else n, m, y, "bitlinear_gemv_packed")
    else:
        tail = _no_pack(y)
    if m == 0:
        return y if nxt is None else (y, nxt)
    res = residual if residual is not None else y
    args = (a.xq, a.s, a.qsum, words, scale, res, y, n, k16, a.xq.stride(0), words.stride(0), res.stride(0), y.stride(0))
    flags = dict(HAS_RES=residual is not None, SCALE_PER_ROW=scale.numel() != 1 or n == 1, **_pdl(a.xq, pdl),
                 PACK=nxt is not None, **tail)  # fmt: skip
    if config is None and _TUNE:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m)
        _gemv_packed_tuned[grid](*args, **flags, ON_GPU=True)
    else:
        bn, bw, warps = config or FIXED_GEMV
        _gemv_packed_kernel[(triton.cdiv(n, bn), m)](*args, **flags, BLOCK_N=bn, BLOCK_W=bw, ON_GPU=not _INTERPRET, num_warps=warps)
    return y if nxt is None else (y, nxt)


def bitlinear_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    K: int,
    int8_dot: bool = True,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Prefill path: quantize_act, then a tensor-core matmul on weights unpacked tile by tile in registers.

    x [M, K] float, packed uint8 [N, ceil(K/4)], scale f32 [1] or [N] → y [M, N] in x's dtype. ``int8_dot``:
    int8 × int8 → int32 MMA, else fp16 operands with fp32 accumulation. ``config`` = (BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages) bypasses the autotuner.
    """
    x = _check_x(x, K, "bitlinear_matmul")
    _check_weight(packed, scale, K, x, "bitlinear_matmul")
    m, n = x.shape[0], packed.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    q, s = quantize_act(x)
    m_bucket = next(b for b in (16, 64, 256, 1024, 1 << 31) if m <= b)
    args = (q, s, packed, scale, y, m, n, K, packed.shape[1], q.stride(0), packed.stride(0), y.stride(0), m_bucket)
    per_row = scale.numel() != 1 or n == 1
    if config is None and _TUNE:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        _mm_w2a8_tuned[grid](*args, SCALE_PER_ROW=per_row, INT8_DOT=int8_dot)
    else:
        bm, bn, bk, warps, stages = config or _FIXED_MM
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _mm_w2a8_kernel[grid](
            *args, SCALE_PER_ROW=per_row, INT8_DOT=int8_dot, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return y


def bitlinear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """BitLinear fast path (the ``"triton"`` backend): x [M, K] float → [M, N] in x's dtype.

    GEMV with fused quantization for M ≤ GEMV_MAX_M (decode), tensor-core matmul otherwise (prefill) or when
    the row bytes are not a multiple of 4.
    """
    if x.dim() == 2 and x.shape[0] <= GEMV_MAX_M and gemv_compatible(packed):
        return bitlinear_gemv(x, packed, scale, K)
    return bitlinear_matmul(x, packed, scale, K)


# --------------------------------------------------------------------------------------------------------------
# int8 output head


def head_int8(
    x: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    config: tuple[int, int, int] | None = None,
    *,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    pdl: bool | str = False,
) -> torch.Tensor:
    """Logits of the int8 head: x [M, D] float (int8-quantized per row in the kernel) · wqᵀ · scale → f32 [M, V].

    ``norm`` weight [D] (with ``eps``): the model's final RMSNorm is applied to x inside the kernel. ``pdl`` as
    for ``bitlinear_gemv``.
    """
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] % 4 or wq.stride(1) != 1:
        raise KernelShapeError(f"head_int8: wq must be int8 [V, D4] with D4 % 4 == 0, got {wq.dtype} {tuple(wq.shape)}")
    d = x.shape[-1] if x.dim() == 2 else -1
    if d < 1 or d > wq.shape[1] or (wq.shape[1] - d) >= 4:
        raise KernelShapeError(f"head_int8: x must be [M, D] with ceil(D/4)·4 = {wq.shape[1]}, got {tuple(x.shape)}")
    x = _check_x(x, d, "head_int8")
    v = wq.shape[0]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (v,):
        raise KernelShapeError(f"head_int8: scale must be f32 [{v}], got {scale.dtype} {tuple(scale.shape)}")
    _check_norm(norm, d, x, "head_int8")
    words = wq.view(torch.int32)  # [V, D4/4]
    m = x.shape[0]
    y = torch.empty((m, v), dtype=torch.float32, device=x.device)
    if m == 0:
        return y
    args = (x, norm if norm is not None else x, words, scale, y, v, d, words.shape[1], eps,
            x.stride(0), words.stride(0), y.stride(0))  # fmt: skip
    use_pdl = _pdl(x, pdl)
    if config is None and _TUNE:
        grid = lambda meta: (triton.cdiv(v, meta["BLOCK_N"]), m)
        _gemv_w8a8_tuned[grid](*args, NORM=norm is not None, BLOCK_P=prologue_block(d), ON_GPU=True, **use_pdl)
    else:
        bn, bw, warps = config or FIXED_GEMV
        _gemv_w8a8_kernel[(triton.cdiv(v, bn), m)](
            *args, NORM=norm is not None, BLOCK_N=bn, BLOCK_W=bw, BLOCK_P=prologue_block(d), ON_GPU=not _INTERPRET,
            num_warps=warps, **use_pdl,
        )  # fmt: skip
    return y


# --------------------------------------------------------------------------------------------------------------
# torch.library custom ops: the same kernels, opaque to torch.compile (which then fuses the ops around them)


@torch.library.custom_op("bitnet158::bitlinear", mutates_args=())
def bitlinear_op(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """``bitlinear_triton`` as a custom op (BitLinear backend ``"triton_op"``)."""
    return bitlinear_triton(x, packed, scale, K)


@bitlinear_op.register_fake
def _bitlinear_fake(x, packed, scale, K):
    return x.new_empty((x.shape[0], packed.shape[0]))


@torch.library.custom_op("bitnet158::head_int8", mutates_args=())
def head_int8_op(
    x: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    norm: torch.Tensor | None = None,
    eps: float = 0.0,
    pdl: int = 0,
) -> torch.Tensor:
    """``head_int8`` as a custom op; ``pdl``: the index of head_int8's pdl in PDL_MODES (an op's schema takes no
    bool | str)."""
    return head_int8(x, wq, scale, norm=norm, eps=eps, pdl=PDL_MODES[pdl])


@head_int8_op.register_fake
def _head_int8_fake(x, wq, scale, norm=None, eps=0.0, pdl=0):
    return x.new_empty((x.shape[0], wq.shape[0]), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# fused elementwise ops of the decoder layer (fewer launches per decoded token)


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if not x.is_floating_point():
        raise KernelShapeError(f"{what}: expected a float tensor, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x [..., D] in one kernel (runtime/model.py's rounding steps, fp32 statistics).

    With ``residual``: h = x + residual first, and returns (h, norm(h)), both in x's dtype.
    """
    x2 = _rows(x, "rmsnorm")
    d = x2.shape[1]
    if weight.shape != (d,):
        raise KernelShapeError(f"rmsnorm: weight must be [{d}], got {tuple(weight.shape)}")
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    r2 = _rows(residual, "rmsnorm") if residual is not None else x2
    if r2.shape != x2.shape:
        raise KernelShapeError(f"rmsnorm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, h, weight, y, d, eps, x2.stride(0), r2.stride(0), h.stride(0), y.stride(0),
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(d), num_warps=8,
        )  # fmt: skip
    if residual is None:
        return y.view(x.shape)
    return h.view(x.shape), y.view(x.shape)


def act_mul_norm(gu: torch.Tensor, weight: torch.Tensor | None, eps: float, relu2: bool) -> torch.Tensor:
    """The MLP middle in one kernel: gu [..., 2I] (gate | up) → sub_norm(act(gate) · up) [..., I].

    act = relu² (bit-exact with the torch ops in the model dtype) or SiLU; ``weight`` None: no sub-norm.
    """
    g2 = _rows(gu, "act_mul_norm")
    if g2.shape[1] % 2:
        raise KernelShapeError(f"act_mul_norm: the last dim must be 2·I, got {g2.shape[1]}")
    inter = g2.shape[1] // 2
    if weight is not None and weight.shape != (inter,):
        raise KernelShapeError(f"act_mul_norm: weight must be [{inter}], got {tuple(weight.shape)}")
    y = torch.empty((g2.shape[0], inter), dtype=gu.dtype, device=gu.device)
    if g2.shape[0]:
        _act_mul_norm_kernel[(g2.shape[0],)](
            g2, weight if weight is not None else g2, y, inter, eps, g2.stride(0), y.stride(0),
            RELU2=relu2, HAS_NORM=weight is not None, BLOCK=triton.next_power_of_2(inter), num_warps=8,
        )  # fmt: skip
    return y.view(*gu.shape[:-1], inter)


def _attention_splits(slots: int) -> tuple[int, int, int]:
    # (keys a block, keys a split, splits a head) of the split attention over a cache of `slots` positions: chunks
    # of whole blocks, at most 16 of them; fixed by the cache size, so a CUDA graph replays them at any position
    block_n = 16 if _INTERPRET else 64
    chunk = block_n * triton.cdiv(slots, block_n * 16)
    return block_n, chunk, triton.cdiv(slots, chunk)


def decode_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, cache_k: torch.Tensor,
    cache_v: torch.Tensor, n_heads: int, n_kv: int, head_dim: int, pdl: bool | str = False, split: bool = False,
    pack_next: NextPack | None = None, pipe: bool | None = None, prefetch: Sequence[torch.Tensor] = (),
    prefetch_early: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PackedAct]:  # fmt: skip
    """``model.attend`` for one token of batch 1: qkv [1, 1, (H + 2·Hkv)·Dh] (the fused projection's output),
    cos/sin the rope tables [S, Dh] (contiguous; the kernel reads row pos, so the step launches no gather), pos
    int64 [1] on the device, caches [≥1, Hkv, S, Dh] → y [1, 1, H·Dh].

    Rope and the cache write round like the torch ops (the cache gets the same bytes); the attention sums in
    fp32 with an online softmax, so y agrees with SDPA to rounding. One kernel with H programs, or with ``split``
    two (flash-decoding): H × up to 16 programs each over a chunk of the cache, then a combine. The chunking
    depends only on the cache size, so a CUDA graph replays it at every position. A program whose chunk spans
    several key blocks (caches over 1,024 slots when split, or the one-kernel form) has the next block in flight
    during each block's math; ``pipe`` forces that on or off (benchmarks/bench_gpu.py's A/B). ``pdl`` as for
    ``bitlinear_gemv`` (with "early-packs" the combine, which reads no weights, triggers early); with it the kernel
    reads pos, cos / sin and the cached keys / values below pos before waiting for the previous kernel, so that
    kernel must not write them (the decode step's q/k/v GEMV does not).

    ``prefetch``: up to four contiguous tensors (the weights of the GEMVs after the attention) that the
    attention's programs bring into L2 (``_l2_prefetch``), so that those GEMVs read them from L2: once their work
    is done, or with ``prefetch_early`` before their wait for the q/k/v GEMV (so during it, which competes with its
    reads). Their bytes must not be written by the kernels in between; nothing happens under the interpreter.

    ``pack_next`` (with ``split``; counter int32 [≥ H + 1], no ``act``): one launch does it all: the last split
    of each head combines it, and the last head combined packs y for the o projection (``pack_act`` of y [1, H·Dh]
    with ``norm``, the attention sub-norm): returns (y, PackedAct)."""
    width = (n_heads + 2 * n_kv) * head_dim
    if qkv.dim() != 3 or qkv.shape[:2] != (1, 1) or qkv.shape[2] != width:
        raise KernelShapeError(f"decode_attention: qkv must be [1, 1, {width}], got {tuple(qkv.shape)}")
    bad_cache = cache_k.shape != cache_v.shape or cache_k.dim() != 4 or cache_k.shape[1] != n_kv
    if n_heads % n_kv or head_dim % 2 or bad_cache or cache_k.shape[3] != head_dim:
        raise KernelShapeError(f"decode_attention: heads {n_heads}/{n_kv}, Dh {head_dim}, cache {tuple(cache_k.shape)}")
    if cache_k.stride(3) != 1 or cache_k.stride() != cache_v.stride() or pos.numel() != 1 or pos.dtype != torch.long:
        raise KernelShapeError("decode_attention: caches must share a layout with contiguous rows; pos int64 [1]")
    slots = cache_k.shape[2]
    if cos.shape != (slots, head_dim) or sin.shape != (slots, head_dim) or not (cos.is_contiguous() and sin.is_contiguous()):
        raise KernelShapeError(f"decode_attention: cos / sin must be the contiguous rope tables [{slots}, {head_dim}], got {tuple(cos.shape)}")
    if pack_next is not None and (not split or pack_next.act is not None):
        raise KernelShapeError("decode_attention: pack_next needs split=True and no act")
    if len(prefetch) > 4 or any(t.device != qkv.device or not t.is_contiguous() or t.numel() * t.element_size() >= 2**31
                                for t in prefetch):  # fmt: skip
        raise KernelShapeError(f"decode_attention: prefetch takes up to 4 contiguous tensors under 2 GiB on {qkv.device}")
    qkv = qkv.contiguous()
    dev = qkv.device
    y = torch.empty((1, 1, n_heads * head_dim), dtype=qkv.dtype, device=dev)
    block_n, chunk, n_split = _attention_splits(cache_k.shape[2])
    if split:
        pm = torch.empty((n_heads, n_split), dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty((n_heads, n_split, head_dim), dtype=torch.float32, device=dev)
    else:
        chunk, n_split, pm, pl, pacc = cache_k.shape[2], 1, y, y, y
    nxt = None
    if pack_next is not None:
        nxt, tail = _next_pack(pack_next, 1, n_heads * head_dim, n_heads + 1, y, "decode_attention")
    else:
        tail = _no_pack(y)
    # the kernel's pack arguments (its input row is y: K = NQ, one row, no act)
    tail = {k: v for k, v in tail.items() if k not in ("P_K", "p_stride_xq", "P_ACT", "P_RELU2")}
    use_pdl = _pdl(qkv, pdl)
    combine = dict(BLOCK_S=triton.next_power_of_2(n_split), BLOCK_D=triton.next_power_of_2(head_dim))
    pf = {f"pf{j}": t for j, t in enumerate(prefetch)} | {f"pf{j}_n": t.numel() * t.element_size() for j, t in enumerate(prefetch)}
    _decode_attention_kernel[(n_heads, n_split)](
        qkv, cos, sin, pos, cache_k, cache_v, y, pm, pl, pacc,
        n_heads * head_dim, n_kv * head_dim, cache_k.stride(1), cache_k.stride(2), head_dim**-0.5, chunk, n_split,
        GROUP=n_heads // n_kv, DH=head_dim, HALF=triton.next_power_of_2(head_dim // 2), BLOCK_N=block_n, SPLIT=split,
        **use_pdl, ON_GPU=not _INTERPRET, FOLD=nxt is not None, **combine, **tail,
        PIPE=chunk > block_n if pipe is None else pipe, **pf, N_PF=len(prefetch), PF_EARLY=prefetch_early, num_warps=4,
    )  # fmt: skip
    if nxt is not None:
        return y, nxt
    if split:
        _attention_combine_kernel[(n_heads,)](
            pm, pl, pacc, y, n_split, DH=head_dim, **combine, **_pdl(qkv, pdl, light=True), num_warps=4,
        )  # fmt: skip
    return y


def argmax(x: torch.Tensor, counter: torch.Tensor, block: int | None = None, pdl: bool | str = False) -> torch.Tensor:
    """``x.argmax(-1, keepdim=True)`` of a 1-D float x as int64 [1], in one launch (the greedy decode step's:
    torch's reduction takes 28 µs over 128,256 logits on an H200, benchmarks/RESULTS.md). ``counter``: int32
    [≥ 1], zero, left zero (``NextPack``'s). ``block``: values per program (default 4,096; the tests use small
    blocks for several programs). Ties give the first index; NaN is not treated as torch treats it."""
    if x.dim() != 1 or not x.is_floating_point() or x.numel() == 0:
        raise KernelShapeError(f"argmax: x must be a non-empty 1-D float tensor, got {x.dtype} {tuple(x.shape)}")
    _check_counter(counter, 1, x.device, "argmax")
    x = x.contiguous()
    block = block or min(4096, triton.next_power_of_2(x.numel()))
    n_prog = triton.cdiv(x.numel(), block)
    pv = torch.empty((n_prog,), dtype=torch.float32, device=x.device)
    pi = torch.empty((n_prog,), dtype=torch.int32, device=x.device)
    out = torch.empty((1,), dtype=torch.long, device=x.device)
    _argmax_kernel[(n_prog,)](
        x, x.numel(), pv, pi, counter, out, BLOCK=block, BLOCK_P=triton.next_power_of_2(n_prog), **_pdl(x, pdl),
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out


# the largest top-k that ``sample`` takes (its last program sorts n_programs · next_power_of_2(k) keys)
SAMPLE_MAX_K = 256
# ``sample`` without a top-k: the bits of the top-p cut each launch finds, and the values per program. 4 bits: 8
# levels of 16 bins. A level's binning costs a select and an add per value and bin, so 8 bits (4 levels of 256
# bins) compiled to 36,000-55,000 SASS instructions a thread a level at 1,024 values a program, against
# 1,200-1,800 for 4 bits (benchmarks/kernel_resources.py, sm_90): 4 bits trade 4 more launches for that
NUCLEUS_BITS = 4
NUCLEUS_BLOCK = 1024


def nucleus_chunk(block: int) -> int:
    """CH of _nucleus_level_kernel for ``block`` values a program: the keys binned at a time, 8,192 key-bin
    sums (32 registers a thread at 8 warps)."""
    return min(block, 8192 >> NUCLEUS_BITS)


def sample(
    x: torch.Tensor, temperature: torch.Tensor, k: int | None, top_p: torch.Tensor | None, min_p: torch.Tensor | None,
    rng: torch.Tensor, counter: torch.Tensor, block: int | None = None, pdl: bool | str = False,
) -> torch.Tensor:  # fmt: skip
    """One id drawn from fp32 logits x [V] / temperature through top-k (1 ≤ k ≤ SAMPLE_MAX_K, or None: none),
    then top-p and min-p (None: off): runtime/sampling.py's filter_logits (ties at a cut keep the lower ids) and
    a draw in proportion to the kept tokens' probabilities. temperature, top_p, min_p: fp32 [1]. Returns int64
    [2]: the id, and how many tokens the filters kept (the most likely ones, so the count says which).

    With a top-k: one launch (_sample_kernel: each block's first k in order, merged by the last program).
    Without: top-p's nucleus can hold most of the vocabulary, so no program sorts it or walks it alone (a
    kernel that walked it by bisection decoded at 353 tok/s against 808 with torch's sort on an H200,
    2026-11-27). Its cut is a radix select over the values' bits instead, 32 / NUCLEUS_BITS launches of all
    programs, each summing the mass of the candidates per digit (_nucleus_level_kernel), then one launch of the
    draw (_nucleus_race_kernel): 9 launches with top-p, 2 without (min-p or the temperature alone). The masses
    are summed in a fixed order, so a replay draws the same.

    ``rng`` int64 [2], (seed, draws): the draw uses Philox keyed by the low 32 bits of seed and by draws, which
    the launch then increments, so a CUDA graph replays a new draw each time; a token's number is keyed by its
    id, so both ways draw the same id from the same filtered set. ``counter``: int32 [≥ 1], zero, left zero
    (``argmax``'s). ``block``: values per program (default 4,096 with a top-k, NUCLEUS_BLOCK without): smaller
    in the tests, to run several programs."""
    if x.dim() != 1 or x.dtype != torch.float32 or x.numel() == 0:
        raise KernelShapeError(f"sample: x must be a non-empty 1-D fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    if k is not None and (not isinstance(k, int) or not 1 <= k <= SAMPLE_MAX_K):
        raise KernelShapeError(f"sample: k must be None or in 1..{SAMPLE_MAX_K}, got {k}")
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != 1 or t.device != x.device):
            raise KernelShapeError(f"sample: {name} must be fp32 [1] on {x.device}")
    if rng.dtype != torch.long or rng.numel() != 2 or not rng.is_contiguous() or rng.device != x.device:
        raise KernelShapeError(f"sample: rng must be int64 [2] on {x.device}")
    _check_counter(counter, 1, x.device, "sample")
    x = x.contiguous()
    n = x.numel()
    out = torch.empty((2,), dtype=torch.long, device=x.device)
    use_pdl = _pdl(x, pdl)
    if k is None:
        _sample_vocab(x, temperature, top_p, min_p, rng, counter, out, block, use_pdl)
        return out
    kp = triton.next_power_of_2(min(k, n))
    block = max(block or min(4096, triton.next_power_of_2(n)), kp)
    n_prog = triton.cdiv(n, block)
    lists = torch.empty((n_prog * kp,), dtype=torch.long, device=x.device)
    fell = torch.empty((n_prog,), dtype=torch.int32, device=x.device)
    _sample_kernel[(n_prog,)](
        x, n, min(k, n), temperature, temperature if top_p is None else top_p, temperature if min_p is None else min_p,
        rng, lists, fell, counter, out, KP=kp, BLOCK=block, BLOCK_P=triton.next_power_of_2(n_prog),
        USE_TOP_P=top_p is not None, USE_MIN_P=min_p is not None, ON_GPU=not _INTERPRET, **use_pdl,
        num_warps=4 if block <= 1024 else 8,
    )  # fmt: skip
    return out


def _sample_vocab(x, temperature, top_p, min_p, rng, counter, out, block, use_pdl: dict) -> None:
    # sample without a top-k (its docstring): the levels of the top-p cut (none without top-p), then the draw
    bits = NUCLEUS_BITS
    n = x.numel()
    block = triton.next_power_of_2(block or min(NUCLEUS_BLOCK, n))
    n_prog = triton.cdiv(n, block)
    nb = 1 << bits
    dev = x.device
    sf = torch.empty((3,), dtype=torch.float32, device=dev)  # m, the target top_p · Z, the mass above the range
    st = torch.empty((3,), dtype=torch.long, device=dev)  # the cut's digits so far, u, the cut's bin
    pmax = torch.empty((n_prog,), dtype=torch.float32, device=dev)
    pm = torch.empty((n_prog, nb), dtype=torch.float32, device=dev)
    pc = torch.empty((n_prog, nb), dtype=torch.int32, device=dev)
    use_top_p = top_p is not None
    common = dict(BLOCK=block, BLOCK_P=triton.next_power_of_2(n_prog), ON_GPU=not _INTERPRET, **use_pdl,
                  num_warps=8 if block >= 1024 else 4)  # fmt: skip
    for level in range(32 // bits if use_top_p else 1):
        _nucleus_level_kernel[(n_prog,)](
            x, n, temperature, top_p if use_top_p else temperature, sf, st, pmax, pm, pc, counter, LEVEL=level,
            BITS=bits, TOP_P=use_top_p, CH=nucleus_chunk(block), **common,
        )  # fmt: skip
    pv = torch.empty((n_prog,), dtype=torch.float32, device=dev)
    pi = torch.empty((n_prog,), dtype=torch.long, device=dev)
    pn = torch.empty((n_prog,), dtype=torch.int32, device=dev)
    _nucleus_race_kernel[(n_prog,)](
        x, n, temperature, temperature if min_p is None else min_p, rng, sf, st, pc, pv, pi, pn, counter, out,
        BITS=bits, TOP_P=use_top_p, USE_MIN_P=min_p is not None, **common,
    )  # fmt: skip


def advance(nxt: torch.Tensor, out: torch.Tensor, n: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, pdl: bool | str = False) -> None:
    """The graph decode step's state after its pick, in one launch instead of four torch ops: ``out[n] = nxt``,
    ``tok = nxt``, ``pos += 1``, ``n += 1``. nxt, n, pos int64 [1], tok int64 [1, 1], out int64 [S] (nothing is
    written past it), all contiguous on one device."""
    ts = (nxt, out, n, tok, pos)
    if any(t.dtype != torch.long or not t.is_contiguous() or t.device != out.device for t in ts) or out.dim() != 1 or \
            any(t.numel() != 1 for t in (nxt, n, tok, pos)):  # fmt: skip
        raise KernelShapeError("advance: nxt, n, tok, pos must be int64 scalars and out int64 [S], contiguous on one device")
    _advance_kernel[(1,)](nxt, out, n, tok, pos, out.numel(), **_pdl(out, pdl), num_warps=1)
