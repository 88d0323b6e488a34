"""BitLinear: a linear layer with ternary weights and per-token int8 activations (exact BitNet b1.58).

    s = 127 / max(max|x|, 1e-5)          per token (the last dim)
    q = clamp(round(x · s), -128, 127)   int8
    y = (q · tᵀ) · scale / s             t ∈ {-1, 0, 1} [out, in], scale f32 [1] or [out]

The weights stay on the device as the packed t2 bytes of the file (formats/PACKED.md §2.1, uint8 [out, ceil(in/4)]).
The reference path computes q · tᵀ with exact integer sums: on CUDA it unpacks on the device at every call (bf16
operands, fp32 accumulation and output); on the CPU it multiplies the 2-bit planes of the packed bytes directly
(int8 × int8 → int32, ``int_dot_packed``). ``cache_unpacked=True`` unpacks once at load and keeps t resident.
Fast paths plug in behind the same ``forward`` through named backends:

    BitLinear.backend = "triton"          # every layer (class attribute), or
    set_backend(model, "triton")          # the BitLinear layers of one module tree
    register_backend("name", fn)          # fn(x2d [M, K] float, packed uint8 [N, ceil(K/4)], scale f32 [1]|[N], K)
                                          #    -> [M, N] in x's dtype

"triton" resolves lazily to ``bitnet158.runtime.kernels.bitlinear_triton``, "cpu" to
``bitnet158.runtime.cpu.bitlinear_cpu``.

The optional int8 output head (``--head int8``) is the same arithmetic on int8 weights with per-row scales:
``quantize_head`` makes them, ``int8_head_logits`` is its reference (and the CPU's) arithmetic.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from bitnet158.formats.ternary import unpack_t2

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Backend) -> None:
    """Make ``fn`` available as ``BitLinear.backend = name``."""
    _BACKENDS[name] = fn


def get_backend(name: str) -> Backend | None:
    """The fast-path function for ``name``, or None for the reference path."""
    if name == "reference":
        return None
    if name not in _BACKENDS and name == "triton":
        from bitnet158.runtime.kernels import bitlinear_triton  # needs triton + CUDA; imported only when asked

        _BACKENDS["triton"] = bitlinear_triton
    if name not in _BACKENDS and name == "cpu":
        from bitnet158.runtime.cpu import bitlinear_cpu  # torch.compile'd GEMV, imported only when asked

        _BACKENDS["cpu"] = bitlinear_cpu
    if name not in _BACKENDS:
        known = ", ".join(sorted({"reference", "triton", "cpu", *_BACKENDS}))
        raise ValueError(f"unknown BitLinear backend {name!r} (known: {known})")
    return _BACKENDS[name]


def set_backend(module: nn.Module, name: str) -> None:
    """Route every BitLinear inside ``module`` through backend ``name`` ("reference", "triton", or registered)."""
    get_backend(name)  # fail now, not at the first forward
    for m in module.modules():
        if isinstance(m, BitLinear):
            m.backend = name


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 absmax quantization of ``x [..., K]`` → (q int8 [..., K], s f32 [..., 1]).

    Done in fp32 whatever x's dtype, with the operations in transformers' order (127 / max, then x · s), so that
    the rounding ties fall exactly where the reference implementation puts them.
    """
    xf = x.float()
    s = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    q = (xf * s).round_().clamp_(-128, 127).to(torch.int8)  # in place: one fp32 temporary, not three
    return q, s


def _unpack_dtype(device: torch.device) -> torch.dtype:
    # CPU: int8 for torch._int_mm (int8 × int8 → int32, exact). CUDA: bf16 holds -1/0/1 and every |q| ≤ 128
    # exactly, and the matmul below accumulates and returns fp32, so the integer sums stay exact too.
    return torch.int8 if device.type == "cpu" else torch.bfloat16


def int_dot(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact integer q · tᵀ as fp32: q int8 [M, K], t unpacked [N, K] (int8 on CPU, bf16 elsewhere) → [M, N]."""
    if t.dtype == torch.int8:
        return torch._int_mm(q, t.t()).float()
    # fp32 output of a bf16 GEMM (cuBLAS accumulates in fp32): every partial sum is an integer below 2^24.
    return torch.mm(q.to(t.dtype), t.t(), out_dtype=torch.float32)


def int_dot_packed(q: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Exact q · tᵀ as fp32 straight from t2 bytes, without materialising t: q int8 [M, K], packed [N, rb].

    With codes c = t + 1 ∈ {0, 1, 2} and bit plane k of byte j holding column 4j + k:
        q · tᵀ = Σ_k q[:, k::4] · c_kᵀ − Σ_i q_i
    Each plane c_k [N, rb] is one shift-and-mask of the packed bytes (a quarter of the weights), so this moves about
    a third of the bytes of unpack-then-matmul. Padding columns have code 1 and q = 0: they add nothing.
    """
    m, k_in = q.shape
    rb = packed.shape[1]
    if k_in != 4 * rb:
        q = torch.nn.functional.pad(q, (0, 4 * rb - k_in))
    planes = q.view(m, rb, 4).permute(2, 1, 0)  # [4, rb, M]: plane k = q[:, k::4]ᵀ
    acc = -q.sum(-1, dtype=torch.int32)[None, :]  # [1, M]
    for k in range(4):
        codes = ((packed >> (2 * k)) & 3).view(torch.int8)  # [N, rb] in {0, 1, 2}
        acc = acc + torch._int_mm(codes, planes[k].contiguous())  # [N, M] int32
    return (
        acc.t().float().contiguous()
    )  # [M, N]; contiguous keeps the later kernels (and their float order) as on the other paths


def reference_bitlinear(
    x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, unpacked: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference arithmetic: x2 [M, K] → [M, N] in x2's dtype. ``unpacked``: t [N, K] kept resident, else the
    2-bit planes on the CPU (``int_dot_packed``) or an unpack on the device at every call."""
    q, s = quantize_activations(x2)  # [M, K] int8, [M, 1] f32
    if unpacked is None and packed.device.type == "cpu":
        acc = int_dot_packed(q, packed)
    else:
        t = unpacked if unpacked is not None else unpack_t2(packed, k, dtype=_unpack_dtype(packed.device))
        acc = int_dot(q, t)
    return acc.mul_(scale).div_(s).to(x2.dtype)  # [M, N]: (acc · scale) / s; acc is a new tensor, so in place


class BitLinear(nn.Module):
    """Ternary linear layer on packed t2 weights; see the module docstring for the math and the backends."""

    backend: str = "reference"

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, in_features: int, cache_unpacked: bool = False):
        super().__init__()
        if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (in_features + 3) // 4:
            want = f"uint8 [out, {(in_features + 3) // 4}]"
            raise ValueError(f"BitLinear: packed must be {want}, got {packed.dtype} {tuple(packed.shape)}")
        out_features = packed.shape[0]
        if scale.dtype != torch.float32 or tuple(scale.shape) not in ((1,), (out_features,)):
            raise ValueError(
                f"BitLinear: scale must be f32 [1] or [{out_features}], got {scale.dtype} {tuple(scale.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("packed", packed, persistent=False)  # uint8 [N, ceil(K/4)]
        self.register_buffer("scale", scale, persistent=False)  # f32 [1] or [N]
        self.cache_unpacked = cache_unpacked
        # [N, K] unpacked on the device once, up front, so that resident_bytes() is true from the start.
        self._unpacked: torch.Tensor | None = None
        if cache_unpacked:
            self._unpacked = unpack_t2(packed, in_features, dtype=_unpack_dtype(packed.device))

    def unpacked(self) -> torch.Tensor:
        """The ternary weight t [N, K] in the compute dtype of the reference path, unpacked on the device."""
        if self._unpacked is not None:
            return self._unpacked
        return unpack_t2(self.packed, self.in_features, dtype=_unpack_dtype(self.packed.device))

    def resident_bytes(self) -> int:
        """Bytes this layer keeps on its device: packed weights, scales and the unpacked cache if any."""
        n = self.packed.numel() + self.scale.numel() * 4
        if self._unpacked is not None:
            n += self._unpacked.numel() * self._unpacked.element_size()
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] → y: [..., N] in x's dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        fast = get_backend(self.backend)
        if fast is not None:
            y = fast(x2, self.packed, self.scale, self.in_features)
        else:
            y = reference_bitlinear(x2, self.packed, self.scale, self.in_features, self._unpacked)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def quantize_head(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantization of a head/embedding weight [V, D] float.

    Returns (wq int8 [V, ceil(D/4)·4], zero-padded so rows are whole int32 words for the GPU kernel; scale f32 [V])
    with weight ≈ wq[:, :D] · scale[:, None], wq = clamp(round(weight / scale), ±127) in fp32. Runs on the weight's
    device.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        got = f"{weight.dtype} {tuple(weight.shape)}"
        raise ValueError(f"quantize_head: weight must be a float [V, D] tensor, got {got}")
    v, d = weight.shape
    d4 = (d + 3) // 4 * 4
    wq = torch.zeros((v, d4), dtype=torch.int8, device=weight.device)
    scale = torch.empty((v,), dtype=torch.float32, device=weight.device)
    # 512 rows at a time through one reused fp32 buffer, in place: at 2B-4T's [128256, 2560] on two CPU cores
    # 0.2 s, against 3.7 s for whole-op temporaries of 8,192 rows (each a fresh 84 MB, out of cache)
    step = 512
    buf = torch.empty((min(step, v), d), dtype=torch.float32, device=weight.device)
    for r0 in range(0, v, step):
        w = weight[r0 : r0 + step]
        b = buf[: w.shape[0]].copy_(w)
        sc = w.abs().amax(dim=1).float().clamp_(min=1e-8).div_(127.0)  # abs and max are exact in any float dtype
        wq[r0 : r0 + step, :d] = b.div_(sc[:, None]).round_().clamp_(-127, 127)
        scale[r0 : r0 + step] = sc
    return wq, scale


def int8_head_logits(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 head on normed x [M, D] → fp32 logits [M, V]: (q · wqᵀ) · scale / s, with q, s the per-token
    quantization above and an exact integer dot (kernels.head_int8 computes the same in one GPU launch).

    The dot reaches 127·127·D, past fp32's exact integers, so it is not a float matmul: on the CPU torch._int_mm
    (int8 × int8 → int32 in oneDNN: 10-12 ms for 2B-4T's [128256, 2560] head on two cores, against 12-19 ms for the
    compiled bf16 head); elsewhere float64, exact below 2^53 (CUDA has no int64 matmul, and its _int_mm wants more
    than 16 rows).
    """
    q, s = quantize_activations(x)  # [M, D] int8, [M, 1] f32
    if q.shape[1] != wq.shape[1]:
        q = torch.nn.functional.pad(q, (0, wq.shape[1] - q.shape[1]))  # the zero columns of wq's padding
    if wq.device.type == "cpu":
        dot = torch._int_mm(q, wq.t()).float()  # [M, V]
    else:
        dot = (q.double() @ wq.double().t()).float()
    return dot * scale / s
