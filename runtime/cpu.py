"""The CPU fast path: batch-1 decode compiled by torch.compile (Inductor's C++/OpenMP code) on the 2-bit bytes.

Why: on a CPU one decode step of the reference path expands every weight to int8 (or re-expands each 2-bit
plane) and runs ~4,000 small torch ops. Here the step reads the packed t2 bytes once and runs two compiled
functions per layer, shared by all layers (one graph each, the weights are arguments):

    pre  = norm → quantize → t2 GEMV (fused q/k/v rows)                   → rope, KV write, SDPA (eager, attend)
    post = sub-norm → quantize → GEMV o → + residual → norm → quantize → GEMV gate/up → act · up → sub-norm
           → quantize → GEMV down → + residual

and the head reads its weights in bf16 when that is lossless (half the bytes of fp32, the same products).

The GEMV, for x [K] and t2 bytes p [N, rb] (formats/PACKED.md §2.1: bit pair k of byte j is column 4j + k,
code c = t + 1), with the activation quantization of runtime/bitlinear.py:

    s = 127 / max(max|x|, 1e-5);  q = clamp(round(x · s), -128, 127)         integer-valued fp32 [K]
    plane_k = q[k::4]  [rb]                                                  (contiguous, realised once)
    acc[n] = Σ_j Σ_k ((p[n, j] >> 2k) & 3) · plane_k[j]  −  Σ q              = q · t[n]
    y = acc · scale / s

Every product is an integer of magnitude ≤ 256 and every partial sum stays below 2^24 for K < 65,536, so the fp32
sums are exact in any order: acc equals the reference's int32 sum. Inductor vectorises the inner loop over j
(16 bytes = 64 weights per AVX-512 iteration). Norm reductions may sum in another order than eager torch, so
the step agrees with the reference path to float rounding, not bit for bit (tests/test_cpu_fast.py).

Inductor inlines cheap elementwise producers into their consumers. For the GEMV that would recompute the
quantization of x for every output row, so the planes go through ``prims.inductor_force_stride_order``, which makes
Inductor store them as a buffer first.

Requirements: TorchDynamo enabled (not ``TORCHDYNAMO_DISABLE=1``) and a C++ compiler. ``unavailable_reason()``
says why not; callers then use the reference path. Compiling takes seconds on the first run; Inductor caches the
result on disk for the next runs.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from bitnet158.runtime.bitlinear import int_dot_packed, quantize_activations

log = logging.getLogger(__name__)


@functools.cache
def unavailable_reason() -> str | None:
    """None when the compiled CPU path can run here, else why not (one line)."""
    # torch.compile reads TORCHDYNAMO_DISABLE when it wraps a function, and then never compiles it
    if os.environ.get("TORCHDYNAMO_DISABLE", "") == "1" or torch._dynamo.config.disable:
        return "TorchDynamo is disabled (TORCHDYNAMO_DISABLE=1)"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    try:
        importlib.import_module("torch._inductor.inductor_prims")  # registers prims.inductor_force_stride_order
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # no compiler, or an Inductor without the prim
        return f"torch.compile cannot build CPU kernels here ({type(e).__name__}: {e})"
    return None


def _realize(t: torch.Tensor) -> torch.Tensor:
    # A contiguous copy of t that Inductor keeps as its own buffer (see the module docstring).
    return torch.ops.prims.inductor_force_stride_order(t, t.contiguous().stride())


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # runtime/model.py RMSNorm on a vector x [D]
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _bitlinear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [K] → y [N] in x's dtype; packed uint8 [N, rb], scale f32 [1] or [N]
    rb = packed.shape[1]
    xf = x.float()
    s = 127.0 / xf.abs().amax().clamp(min=1e-5)
    q = (xf * s).round().clamp(-128, 127)  # integer-valued fp32 [K]
    q = F.pad(q, (0, 4 * rb - q.shape[0]))  # padding columns have code 1 and q = 0: they add nothing
    planes = _realize(q.view(rb, 4).t())  # [4, rb]: plane k = q[k::4]
    p = packed.to(torch.int32)
    acc = (
        ((p & 3).float() * planes[0] + ((p >> 2) & 3).float() * planes[1])
        + (((p >> 4) & 3).float() * planes[2] + ((p >> 6) & 3).float() * planes[3])
    ).sum(-1)  # [N] Σ c·q, exact
    return ((acc - q.sum()) * scale / s).to(x.dtype)


def _pre(x, norm_w, eps: float, qkv_packed, qkv_scale):
    # x [D] → fused q/k/v projections [Nq + 2·Nkv] of norm(x)
    return _bitlinear(_rms(x, norm_w, eps), qkv_packed, qkv_scale)


def _post(x, y, attn_sub_w, o_packed, o_scale, mlp_norm_w, gu_packed, gu_scale, mlp_sub_w, d_packed, d_scale,
          eps: float, relu2: bool):  # fmt: skip
    # x [D] the layer input, y [Nq] the attention output → the layer output [D] (Block.forward after attention)
    if attn_sub_w is not None:
        y = _rms(y, attn_sub_w, eps)
    h = x + _bitlinear(y, o_packed, o_scale)
    g, u = _bitlinear(_rms(h, mlp_norm_w, eps), gu_packed, gu_scale).chunk(2)  # [I] each
    z = (torch.square(F.relu(g)) if relu2 else F.silu(g)) * u
    if mlp_sub_w is not None:
        z = _rms(z, mlp_sub_w, eps)
    return h + _bitlinear(z, d_packed, d_scale)


def _head(x, norm_w, eps: float, head_w):
    # final norm and head: x [D] → fp32 logits [V], the products in fp32 whatever head_w's dtype
    return (head_w.float() * _rms(x, norm_w, eps).float()).sum(-1)


@functools.cache
def kernels() -> SimpleNamespace:
    """The compiled functions ``pre``, ``post``, ``head`` and ``bitlinear``, wrapped on first use (after
    ``unavailable_reason()`` said yes); each compiles at its first call for each new set of shapes."""
    compiled = functools.partial(torch.compile, dynamic=False, fullgraph=True)
    return SimpleNamespace(
        pre=compiled(_pre), post=compiled(_post), head=compiled(_head), bitlinear=compiled(_bitlinear)
    )


_vec_state = {"ok": False, "failed": False}  # kernels().bitlinear ran / failed to compile in this process


def bitlinear_cpu(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """BitLinear backend "cpu": x2 [M, K] → [M, N]. One row: the compiled GEMV; more rows (prefill), or when
    compiling failed: the reference arithmetic (int8 × int8 → int32 on the 2-bit planes)."""
    if x2.shape[0] == 1 and not _vec_state["failed"]:
        try:
            y = kernels().bitlinear(x2[0], packed, scale)[None]
        except Exception as e:
            if _vec_state["ok"]:
                raise
            log.warning("the compiled CPU GEMV failed (%s: %s); using the reference arithmetic", type(e).__name__, e)
            _vec_state["failed"] = True
        else:
            _vec_state["ok"] = True
            return y
    q, s = quantize_activations(x2)
    return (int_dot_packed(q, packed) * scale / s).to(x2.dtype)
