"""The CPU fast path: batch-1 decode compiled by torch.compile (Inductor's C++/OpenMP code) on the 2-bit bytes.

Why: on a CPU one decode step of the reference path expands every weight to int8 (or re-expands each 2-bit
plane) and runs ~4,000 small torch ops. Here the step reads the packed t2 bytes once and runs one compiled
function per layer, the same graph for all layers (the weights and the cache are arguments):

    norm → quantize → t2 GEMV (fused q/k/v rows) → model.attend (rope, KV-cache write, SDPA over
    the filled prefix) → sub-norm → quantize → GEMV o → + residual → norm → quantize → GEMV gate/up
    → act · up → sub-norm → quantize → GEMV down → + residual

and one more for the final norm and the head, which reads the head in the dtype it is stored in (bf16 or f16
when the loader could keep it narrow: half the bytes of fp32) and multiplies in fp32. The position is a Python
int, which torch.compile would specialise on the first value it sees and make symbolic only at the second: a
second compile at the second decode step of a fresh process (3.4 s at 2B-4T with an empty Inductor cache). The
caches' length (prompt + new tokens) would do the same at the next generation of another length, and miss
Inductor's on-disk cache in the next process. Called under ``symbolic_position()``, the layer compiles once, with
both symbolic, so one graph serves every step and every cache, and attention reads only the filled part of the
cache (benchmarks/RESULTS.md, "What a fresh process pays first").

The GEMV, for x [K] and t2 bytes p [N, rb] (formats/PACKED.md §2.1: bit pair k of byte j is column 4j + k,
code c = t + 1), with the activation quantization of runtime/bitlinear.py:

    s = 127 / max(max|x|, 1e-5);  q = clamp(round(x · s), -128, 127)         integer-valued fp32 [K]
    q_k = q[k::4]  [rb]                                                     activation planes
    a_0 = q_0,  a_k = q_k − 4·q_{k−1}  (k = 1..3)                           [4, rb], realised once
    acc[n] = Σ_j Σ_k (p[n, j] >> 2k) · a_k[j]  −  Σ q                       = q · t[n]
    y = acc · scale / s

The shifted byte p >> 2k = c_k + 4·c_{k+1} + 16·c_{k+2} + … holds the higher codes too, and the a_k telescope
them away: Σ_k a_k·(p >> 2k) = Σ_k c_k·q_k. So each plane costs a shift, a conversion and a fused multiply-add,
with no mask. All values are integers: per byte the four terms stay below 2^17 and sum to at most 4·2·128 in
magnitude, so for K ≤ MAX_K = 32,768 every running sum stays below 2^24 and the fp32 arithmetic is exact in any
order: acc equals the reference's int32 sum (2B-4T's largest K is 6,912, Llama3-8B-1.58's 14,336; a larger K
fails at compile time and the caller falls back to the reference path). Inductor vectorises the loop over j
(16 bytes = 64 weights per AVX-512 iteration). The norms' reductions may sum in another order than eager torch,
so the step agrees with the reference path to float rounding, not bit for bit (tests/test_cpu_fast.py).

Inductor inlines cheap elementwise producers into their consumers. For a GEMV that would recompute the
quantization (or the final norm, for the head) of x for every output row, so those vectors go through
``prims.inductor_force_stride_order``, which makes Inductor store them as a buffer first.

Requirements: TorchDynamo enabled (not ``TORCHDYNAMO_DISABLE=1``) and a C++ compiler. ``unavailable_reason()``
says why not; callers then use the reference path. Compiling takes seconds on the first run; Inductor caches the
result on disk for the next runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from bitnet158.runtime.bitlinear import quantize_activations, reference_bitlinear
from bitnet158.runtime.model import attend

log = logging.getLogger(__name__)


def cache_home() -> str:
    """$XDG_CACHE_HOME/bitnet158 (default ~/.cache/bitnet158): what the runtime keeps between runs."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bitnet158")


def keep_compile_cache() -> None:
    """For the command-line tools: point torch.compile's cache (the compiled CPU step: ~14 s to build at 2B-4T,
    ~4 s to load) at $XDG_CACHE_HOME/bitnet158/torchinductor (default ~/.cache/...), unless TORCHINDUCTOR_CACHE_DIR
    is set. Torch's default, /tmp/torchinductor_$USER, is emptied by a reboot or a tmp cleaner, and the next run
    compiles again. Nothing changes when the folder cannot be made or written."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    path = os.path.join(cache_home(), "torchinductor")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    if os.access(path, os.W_OK | os.X_OK):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


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
    # A contiguous copy of t that Inductor keeps as its own buffer instead of recomputing it inside the loop of a
    # GEMV that reads it (see the module docstring).
    return torch.ops.prims.inductor_force_stride_order(t, t.contiguous().stride())


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # runtime/model.py RMSNorm on a vector x [D]
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


MAX_K = 32_768  # the largest input width whose fp32 sums stay exact (see the module docstring)


def _bitlinear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [K] → y [N] in x's dtype; packed uint8 [N, rb], scale f32 [1] or [N]
    rb = packed.shape[1]
    if 4 * rb > MAX_K:  # checked while tracing (static shapes)
        raise ValueError(f"the compiled CPU GEMV is exact only for K <= {MAX_K}, got {4 * rb}")
    xf = x.float()
    s = 127.0 / xf.abs().amax().clamp(min=1e-5)
    q = (xf * s).round().clamp(-128, 127)  # integer-valued fp32 [K]
    q = F.pad(q, (0, 4 * rb - q.shape[0]))  # padding columns have code 1 and q = 0: they add nothing
    planes = q.view(rb, 4).t()  # [4, rb]: plane k = q[k::4]
    a = _realize(torch.cat([planes[:1], planes[1:] - 4 * planes[:-1]]))  # [4, rb] telescoped, see above
    p = packed.to(torch.int32)
    acc = (
        (p.float() * a[0] + (p >> 2).float() * a[1]) + ((p >> 4).float() * a[2] + (p >> 6).float() * a[3])
    ).sum(-1)  # [N] Σ c·q, exact
    return ((acc - q.sum()) * scale / s).to(x.dtype)


class LayerWeights(NamedTuple):
    """One layer's tensors as the compiled step takes them (q/k/v and gate/up fused, runtime/fast.py)."""

    attn_norm: torch.Tensor  # [D]
    qkv_packed: torch.Tensor  # uint8 [Nq + 2·Nkv, ceil(D/4)]
    qkv_scale: torch.Tensor  # f32 [Nq + 2·Nkv]
    attn_sub_norm: torch.Tensor | None  # [Nq]
    o_packed: torch.Tensor  # uint8 [D, ceil(Nq/4)]
    o_scale: torch.Tensor  # f32 [1] or [D]
    mlp_norm: torch.Tensor  # [D]
    gu_packed: torch.Tensor  # uint8 [2·I, ceil(D/4)]
    gu_scale: torch.Tensor  # f32 [2·I]
    mlp_sub_norm: torch.Tensor | None  # [I]
    down_packed: torch.Tensor  # uint8 [D, ceil(I/4)]
    down_scale: torch.Tensor  # f32 [1] or [D]


def _layer(x, cos, sin, pos: int, cache_k, cache_v, w: LayerWeights, eps: float, relu2: bool, heads: tuple):
    # x [D] at position pos → the layer output [D] (Block.forward for one token); heads = (H, Hkv, Dh)
    n_heads, n_kv, head_dim = heads
    nq, nkv = n_heads * head_dim, n_kv * head_dim
    qkv = _bitlinear(_rms(x, w.attn_norm, eps), w.qkv_packed, w.qkv_scale).view(1, 1, -1)
    q, k, v = qkv.split([nq, nkv, nkv], dim=-1)
    y = attend(q, k, v, cos, sin, pos, None, cache_k, cache_v, n_heads, n_kv, head_dim).view(-1)  # [Nq]
    if w.attn_sub_norm is not None:
        y = _rms(y, w.attn_sub_norm, eps)
    h = x + _bitlinear(y, w.o_packed, w.o_scale)
    g, u = _bitlinear(_rms(h, w.mlp_norm, eps), w.gu_packed, w.gu_scale).chunk(2)  # [I] each
    z = (torch.square(F.relu(g)) if relu2 else F.silu(g)) * u
    if w.mlp_sub_norm is not None:
        z = _rms(z, w.mlp_sub_norm, eps)
    return h + _bitlinear(z, w.down_packed, w.down_scale)


def _head(x, norm_w, eps: float, head_w):
    # final norm and head: x [D] → fp32 logits [V], the products in fp32 whatever head_w's dtype
    return (head_w.float() * _realize(_rms(x, norm_w, eps).float())).sum(-1)  # the norm once, not once per row


# Graphs each compiled function may keep. Each set of shapes (and dtypes) compiles its own: the layer one per model
# (two with position 0's), the head one, the GEMV four (q/k/v, o, gate/up, down). Dynamo's default limit, 8 per
# function and process, would stop the 3rd model a process loads at its GEMVs, and fullgraph=True makes that an
# error, not a fallback.
RECOMPILE_LIMIT = 64


def _has_dynamic_sources() -> bool:
    return hasattr(getattr(torch.compiler, "config", None), "dynamic_sources")


@functools.cache
def kernels() -> SimpleNamespace:
    """The compiled functions ``layer``, ``head`` and ``bitlinear``, wrapped on first use (after
    ``unavailable_reason()`` said yes); each compiles at its first call for each new set of shapes."""
    # fp contraction: the GEMV's multiply-adds become FMAs (exact on these integers); the norms may round differently
    kw = dict(fullgraph=True, options={"cpp.enable_floating_point_contract_flag": "fast"})
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        kw["recompile_limit"] = RECOMPILE_LIMIT
    else:  # an older torch has only the process-wide limit: raise it (never lower it)
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    # Every shape and int static: one graph per model's shapes, and the head counts stay ints (SDPA's enable_gqa
    # must be a bool). Automatic dynamic shapes would instead make whatever differs from an earlier model's call
    # symbolic. The layer's position and cache length become symbolic under symbolic_position(), which overrides
    # dynamic=False; a torch without that setting keeps automatic dynamic shapes for them (a compile at step 2).
    return SimpleNamespace(
        layer=torch.compile(_layer, dynamic=False if _has_dynamic_sources() else None, **kw),
        head=torch.compile(_head, dynamic=False, **kw),
        bitlinear=torch.compile(_bitlinear, dynamic=False, **kw),
    )


def symbolic_position():
    """The context to call ``kernels().layer`` in: its first compile treats ``pos`` and the caches' length (dim 2
    of cache_k / cache_v [B, Hkv, max_seq, Dh]: prompt + new tokens) as symbolic, not as constants to compile
    again on when the next step or the next generation changes them. torch.compile reads the setting only when it
    compiles."""
    # dynamic=True would make every int symbolic, the head counts too, and SDPA refuses a symbolic enable_gqa
    if not _has_dynamic_sources():  # a torch before the setting: compile again at the second step
        return contextlib.nullcontext()
    return torch.compiler.config.patch(dynamic_sources="L['pos'],L['cache_k']:2,L['cache_v']:2")


# The compiled GEMV's shape keys (_gemv_key) that ran / failed to compile in this process. Per key, not per
# process: a model loaded later brings new shapes, whose compile may fail after others' succeeded.
_vec_state: dict[str, set] = {"ok": set(), "failed": set()}


def _gemv_key(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> tuple:
    # what kernels().bitlinear compiles a graph for (its shapes are static)
    return x2.dtype, packed.shape, scale.shape


# From this many rows (a prompt) bitlinear_rows takes over from the reference's four narrow matmuls: whole 2B-4T
# prompts run 1.2-1.35× faster at 512 tokens and 1.5× at 1,024, and the two are within noise from 16 to 256
# (2 cores, benchmarks/cpu_prefill_gemm.py). Decode's single row takes the compiled GEMV.
PREFILL_ROWS = 64
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 4, 1)


def bitlinear_rows(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """x2 [M, K] → [M, N] with the reference's integer sums and float ops (bit for bit), in one int8 matmul.

    The reference (``bitlinear.int_dot_packed``) multiplies each 2-bit plane apart: four int8 matmuls of width
    rb = ceil(K/4), then three int32 adds of [N, M] and a transpose. Here the four planes' codes lie side by side,
    c [N, 4·rb] (column k·rb + j holds weight column 4j + k), q's columns are permuted to match, and one matmul
    sums them all, and the three adds and the transpose go."""
    q, s = quantize_activations(x2)  # [M, K] int8, [M, 1] f32
    m = q.shape[0]
    n, rb = packed.shape
    q = F.pad(q, (0, 4 * rb - k))  # padding columns have code 1 and q = 0: they add nothing
    codes = (packed[:, None, :] >> _SHIFTS).bitwise_and_(3).view(torch.int8).view(n, 4 * rb)  # [N, 4·rb], c = t + 1
    qp = q.view(m, rb, 4).transpose(1, 2).reshape(m, 4 * rb)  # [M, 4·rb]: q in the codes' column order
    acc = torch._int_mm(qp, codes.t())  # [M, N] int32: Σ q·c
    acc -= q.sum(-1, dtype=torch.int32, keepdim=True)  # Σ q·(c − 1) = q · tᵀ
    # (acc · scale) / s as in the reference, in place: one [M, N] fp32 allocation instead of three (an int32 · f32
    # multiply that promotes is slower than the conversion and two in-place passes)
    return acc.float().mul_(scale).div_(s).to(x2.dtype)


def bitlinear_cpu(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """BitLinear backend "cpu": x2 [M, K] → [M, N]. One row: the compiled GEMV; PREFILL_ROWS rows or more:
    ``bitlinear_rows``; between them, K > MAX_K, or when compiling failed: the reference arithmetic (int8 × int8 →
    int32 on the 2-bit planes)."""
    if x2.shape[0] >= PREFILL_ROWS:
        return bitlinear_rows(x2, packed, scale, k)
    key = _gemv_key(x2, packed, scale) if x2.shape[0] == 1 and k <= MAX_K else None
    if key is not None and key not in _vec_state["failed"]:
        try:
            y = kernels().bitlinear(x2[0], packed, scale)[None]
        except Exception as e:
            if key in _vec_state["ok"]:
                raise  # it compiled and ran at these shapes: this failure (out of memory, a bug) is not compiling's
            # compiling these shapes failed: the reference arithmetic from now on for them, said once a process
            level = logging.DEBUG if _vec_state["failed"] else logging.WARNING
            log.log(level, "the compiled CPU GEMV failed (%s: %s); using the reference arithmetic", type(e).__name__, e)
            _vec_state["failed"].add(key)
        else:
            _vec_state["ok"].add(key)
            return y
    return reference_bitlinear(x2, packed, scale, k)
