"""Ternary codecs and absmean ternarization, in plain torch (any device).

Two 2-bit layouts, both storing code = t + 1 (-1 -> 0, 0 -> 1, +1 -> 2; code 3 never appears):

- ``t2`` (ours, PACKED.md §2.1): packed along the *input* dim inside each row. ``[out, in]`` ->
  ``uint8 [out, ceil(in/4)]``; byte j of row r holds weights (r, 4j + k) in bits 2k..2k+1 (weight 4j in the
  two least significant bits). Codes that pad a row past ``in`` are 1 (zero).
- ``hf`` (transformers ``integrations/bitnet.py`` pack_weights/unpack_weights, REFERENCE §4): packed along the
  *output* rows in four contiguous blocks. ``[out, in]`` -> ``uint8 [out/4, in]`` with R = out/4 and unpacked
  row ``i*R + r = ((packed[r] >> 2i) & 3) - 1``.

Every function here is shifts, masks and reshapes on tensors, so it runs where its input lives (CPU or CUDA)
without a host round trip.
"""

from __future__ import annotations

import torch

__all__ = [
    "pack_t2",
    "unpack_t2",
    "pack_hf",
    "unpack_hf",
    "absmean_ternarize",
    "scaled_ternary_scale",
    "hf_to_t2",
    "T2_PAD_CODE",
]

# The code that pads a t2 row past `in` (PACKED.md §2.1): code 1 is the value 0.
T2_PAD_CODE = 1
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_codes(t: torch.Tensor, what: str) -> torch.Tensor:
    """Checks that `t` is an integer tensor in {-1, 0, 1} and returns its codes t + 1 as uint8."""
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"{what}: expected an integer tensor with values in {{-1, 0, 1}}, got dtype {t.dtype}")
    if t.dtype == torch.int8 and t.numel():
        # Fast path (5x, matters for the converter): one min/max pass, and +1 cannot overflow int8 in range.
        lo, hi = torch.aminmax(t)
        if lo < -1 or hi > 1:
            raise ValueError(f"{what}: values must be in {{-1, 0, 1}}, found min {int(lo)} max {int(hi)}")
        return (t + 1).view(torch.uint8)
    wide = t.to(torch.int16) if t.dtype in (torch.int8, torch.uint8) else t
    if wide.numel() and bool(((wide < -1) | (wide > 1)).any()):
        raise ValueError(f"{what}: values must be in {{-1, 0, 1}}, found min {int(wide.min())} max {int(wide.max())}")
    # +1 in a signed type at least 16 bits wide: uint8 has no -1.
    return (wide + 1).to(torch.uint8)


def _shifts(device: torch.device) -> torch.Tensor:
    # Bit offsets of the four 2-bit fields of a byte: field k sits at bits 2k..2k+1. arange is built on the
    # device itself (torch.tensor([...], device=cuda) would be a host-to-device copy on every call).
    return torch.arange(0, 8, 2, dtype=torch.uint8, device=device)


def pack_t2(t: torch.Tensor) -> torch.Tensor:
    """Packs a ternary matrix ``[out, in]`` (integers in {-1, 0, 1}) into t2 bytes ``uint8 [out, ceil(in/4)]``."""
    if t.dim() != 2:
        raise ValueError(f"pack_t2: expected a 2-D [out, in] tensor, got shape {tuple(t.shape)}")
    out_f, in_f = t.shape
    codes = _as_codes(t, "pack_t2")
    row_bytes = (in_f + 3) // 4
    pad = row_bytes * 4 - in_f
    if pad:
        # Padding codes are 1 (the value 0), so a reader that unpacks whole bytes sees zeros past `in`.
        codes = torch.nn.functional.pad(codes, (0, pad), value=T2_PAD_CODE)
    fields = codes.reshape(out_f, row_bytes, 4) << _shifts(codes.device)  # [out, rb, 4], fields in place
    # The fields occupy disjoint bits, so their sum is their bitwise OR (and cannot overflow a byte).
    return fields.sum(dim=-1, dtype=torch.uint8)


def unpack_t2(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Unpacks t2 bytes ``uint8 [out, ceil(in/4)]`` into ``[out, in]`` values in {-1, 0, 1} of `dtype`.

    Runs on the tensor's device. Code 3 is not checked here (``PackedFile.verify`` does): it would decode as 2.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_t2: expected uint8 [out, rb], got {packed.dtype} {tuple(packed.shape)}")
    row_bytes = (in_features + 3) // 4
    if in_features < 1 or packed.shape[1] != row_bytes:
        raise ValueError(
            f"unpack_t2: in_features={in_features} needs {row_bytes} bytes per row, packed has {packed.shape[1]}"
        )
    out_f = packed.shape[0]
    codes = (packed.unsqueeze(-1) >> _shifts(packed.device)) & 3  # [out, rb, 4]
    codes = codes.reshape(out_f, row_bytes * 4)[:, :in_features]
    # Subtract in the target dtype: uint8 cannot hold -1.
    return codes.to(dtype) - 1


def pack_hf(t: torch.Tensor) -> torch.Tensor:
    """Packs a ternary matrix ``[out, in]`` into transformers' layout ``uint8 [out/4, in]`` (out a multiple of 4).

    Unlike transformers' ``pack_weights`` this does not modify its input.
    """
    if t.dim() != 2:
        raise ValueError(f"pack_hf: expected a 2-D [out, in] tensor, got shape {tuple(t.shape)}")
    out_f, in_f = t.shape
    if out_f % 4:
        # transformers stores `out // 4` packed rows, so its layout cannot describe other row counts.
        raise ValueError(f"pack_hf: out={out_f} is not a multiple of 4")
    codes = _as_codes(t, "pack_hf").reshape(4, out_f // 4, in_f)  # block i = rows i*R .. i*R + R - 1
    fields = codes << _shifts(codes.device).view(4, 1, 1)
    return fields.sum(dim=0, dtype=torch.uint8)


def unpack_hf(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Unpacks transformers' layout ``uint8 [R, in]`` into ``[4R, in]`` values in {-1, 0, 1} of `dtype`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_hf: expected uint8 [R, in], got {packed.dtype} {tuple(packed.shape)}")
    rows, in_f = packed.shape
    codes = (packed.unsqueeze(0) >> _shifts(packed.device).view(4, 1, 1)) & 3  # [4, R, in]
    return codes.reshape(4 * rows, in_f).to(dtype) - 1


def absmean_ternarize(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-tensor absmean ternarization (REFERENCE §2): returns ``(t int8 [same shape], m)`` with ``w ≈ m · t``.

    ``m = max(mean|w|, 1e-5)`` and ``t = clamp(round(w / m), -1, 1)`` are computed in float32; torch.round rounds
    half to even. `m` is returned as a Python float holding the float32 value exactly. (transformers' online
    quantizer multiplies by ``1/m`` in the weight's dtype instead of dividing in float32; the two can differ on
    values within an ulp of ±m/2.)
    """
    if not w.is_floating_point():
        raise ValueError(f"absmean_ternarize: expected a float tensor, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError("absmean_ternarize: empty tensor")
    wf = w.to(torch.float32)
    m = wf.abs().mean().clamp(min=1e-5)
    if not torch.isfinite(m):
        raise ValueError("absmean_ternarize: the tensor holds non-finite values")
    t = torch.round(wf / m).clamp(-1, 1).to(torch.int8)
    return t, float(m)


def scaled_ternary_scale(w: torch.Tensor) -> float | None:
    """Returns c if ``w == c · t`` exactly for ternary t and one c > 0, else None.

    Every non-zero ``|w|`` must equal c. c is returned as a Python float holding a float32 value exactly, so
    ``c · t`` in float32 reproduces `w` (for float16/bfloat16/float32 inputs) bit for bit. An all-zero tensor
    returns None: any c fits, and ``absmean_ternarize`` already maps it exactly (t = 0, m = 1e-5).
    """
    if not w.is_floating_point() or w.numel() == 0:
        return None
    a = w.detach().abs()
    nonzero = a[a != 0]
    if nonzero.numel() == 0:
        return None
    c = nonzero[0]
    if not torch.isfinite(c) or not bool((nonzero == c).all()):
        return None
    c32 = c.to(torch.float32)
    # A float64 c that float32 cannot hold would not reproduce w from a float32 scale.
    if c32.to(w.dtype) != c:
        return None
    return float(c32)


def hf_to_t2(packed: torch.Tensor) -> torch.Tensor:
    """Transcodes transformers' layout ``uint8 [R, in]`` straight to t2 bytes ``uint8 [4R, ceil(in/4)]`` (CPU).

    Equal to ``pack_t2(unpack_hf(packed))`` but 2-bit fields are moved inside 32-bit words in numpy, with no
    int8 intermediate: about 30x faster, which is most of a packed checkpoint's conversion time. Codes are
    copied as they are (a code 3 stays a code 3: check the input first).
    """
    import numpy as np

    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"hf_to_t2: expected uint8 [R, in], got {packed.dtype} {tuple(packed.shape)}")
    p = packed.cpu().numpy()
    rows, in_f = p.shape
    row_bytes = (in_f + 3) // 4
    if in_f % 4:
        # Pad columns with bytes whose four fields are all code 1 (zero), as t2 pads its rows.
        p = np.pad(p, ((0, 0), (0, row_bytes * 4 - in_f)), constant_values=0x55)
    # Little-endian u32 word j of a row holds source bytes (columns) 4j..4j+3 in its bytes 0..3.
    w = np.ascontiguousarray(p).view("<u4")  # [R, row_bytes]
    out = np.empty((4, rows, row_bytes), dtype=np.uint8)
    for i in range(4):  # block i = output rows i*R .. i*R + R - 1, stored in the bits 2i..2i+1 of each byte
        x = (w >> np.uint32(2 * i)) & np.uint32(0x03030303)  # column 4j+k's code at bits 8k..8k+1
        x |= x >> np.uint32(6)  # codes of columns k, k+1 side by side at bits 0-3 and 16-19
        x &= np.uint32(0x000F000F)
        x |= x >> np.uint32(12)  # all four codes in bits 0..7: column 4j+k at bits 2k..2k+1
        out[i] = x  # the uint8 store keeps the low byte
    return torch.from_numpy(out.reshape(4 * rows, row_bytes))
