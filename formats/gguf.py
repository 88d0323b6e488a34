"""GGUF reading and the ternary GGUF codecs (I2_S, TQ2_0, TQ1_0).

This module owns every GGUF byte bitnet158 reads, and the three ternary tensor layouts that the exporter
writes. All integers are little-endian.

GGUF container (v2 and v3; v1 used 32-bit counts and is refused)
------------------------------------------------------------------
::

    offset 0   magic       4 bytes  ASCII "GGUF"
    offset 4   version     u32      2 or 3
    offset 8   n_tensors   u64
    offset 16  n_kv        u64
    offset 24  n_kv key/value pairs:
                 key        string  (u64 length + UTF-8 bytes, no terminator)
                 value_type u32     GGUFValueType: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool,
                                    8 string, 9 array, 10 u64, 11 i64, 12 f64
                 value              the scalar; or a string; or, for an array: elem_type u32, count u64,
                                    then count elements (arrays of arrays nest)
               n_tensors tensor infos:
                 name       string
                 n_dims     u32     1..4
                 dims       u64 x n_dims, ggml order: dims[0] is the innermost (contiguous) axis, so the
                            logical (row-major) shape is reversed(dims): a linear weight [out, in] has
                            dims = [in, out]
                 type       u32     GGMLQuantizationType
                 offset     u64     relative to the start of the data section, a multiple of the alignment
               zero padding up to a multiple of the alignment
    data       tensor data (the data section starts here)

The alignment is the u32 key ``general.alignment`` (a power of two), 32 when absent. Every tensor's byte
size follows from its type and element count ``n``: F32 4n, F16/BF16 2n, TQ2_0 66·n/256, TQ1_0 54·n/256
(TQ rows must be a multiple of 256 weights) and I2_S ``n/4 + 32`` (a special case, below).

ggml's quantized float types (Q4_0 … Q8_0, the K-quants Q2_K … Q6_K, the IQ types: ``DEQUANT_TYPES``) are
read only for the non-ternary tensors: ``llama-quantize`` writes a TQ1_0/TQ2_0 model's ``token_embd`` as Q4_K.
Their size is n / block · bytes per block (``gguf.GGML_QUANT_SIZES``; rows a multiple of the block). They are
dequantized to f32 by gguf-py's ``gguf.quants.dequantize``, the reference implementation of ggml's layouts, a
slice of rows at a time (``DEQUANT_ROWS``).

Ternary layouts (codes are t + 1: 0 → −1, 1 → 0, 2 → +1; 3 never appears in a valid tensor)
---------------------------------------------------------------------------------------------
**I2_S (type 36, Microsoft bitnet.cpp; src/ggml-bitnet-mad.cpp ``quantize_i2_s``, x86 layout)**::

    bytes [0, n/4)        128-weight blocks of 32 bytes, over the flattened [rows][cols] weights.
                          Byte b (0..31) of block k holds weights 128k + b, +32+b, +64+b, +96+b in
                          bits 7-6, 5-4, 3-2, 1-0 (the first weight in the most significant pair).
    bytes [n/4, n/4+4)    f32 per-tensor scale; W = scale · t
    bytes [n/4+4, n/4+32) filler (zeros when we write; never read)

We require the row length to be a multiple of 128 (bitnet.cpp's kernels walk whole blocks per row), so a
block never straddles two rows. (ARM builds of bitnet.cpp use 64-weight/16-byte blocks; files in that layout
are byte-for-byte the same size and cannot be told apart: we read the x86 layout that Microsoft publishes.
The same holds for the "weight-parallel" x86 variant, built only when gemm-config.h's default ``#define
ACT_PARALLEL`` is removed, which interleaves 4 rows per byte instead.)

**TQ2_0 (type 35, ggml; gguf-py quants.py ``TQ2_0``)**: 256 weights in 66 bytes, ``qs[64]`` then an f16
``d``. Half h (0, 1) of a block is ``qs[32h : 32h+32]``; byte j of it holds weights 128h + 32k + j for
k = 0..3 in bits 2k..2k+1 (low bits first). W = d · t.

**TQ1_0 (type 34, ggml; gguf-py quants.py ``TQ1_0``)**: 256 weights in 54 bytes, ``qs[48]``, ``qh[4]``, then
an f16 ``d``. Five base-3 digits per byte: byte j of ``qs[0:32]`` holds codes c[32i + j] for i = 0..4, byte j
of ``qs[32:48]`` holds c[160 + 16i + j] for i = 0..4, byte j of ``qh`` holds c[240 + 4i + j] for i = 0..3.
The value v = Σ c_i·3^(4−i) (the first digit most significant; qh's fifth digit is 0) is stored as
``ceil(v · 256 / 243)``, a fixed-point fraction of 3^5, so digit i is ``((q · 3^i) mod 256) · 3 >> 8``.

Our t2 layout (PACKED.md §2.1): uint8 [out, ceil(in/4)], byte j of a row holds weights 4j + k in bits 2k.
Every codec here moves 2-bit fields (or base-3 digits) between layouts with integer ops; weights are never
unpacked to floats. A TQ block scale d is f16, so a per-tensor scale survives t2 -> TQ only if f16 holds it
exactly (``exact=True`` refuses otherwise); I2_S keeps the f32 scale bit for bit.

What the reader checks (GGUFFile), before any allocation sized by the file
-----------------------------------------------------------------------------
Magic and version; n_kv and n_tensors against the bytes left (each pair / info has a minimum size); every
string and array length against the bytes left (arrays: count × minimum element size); array nesting depth;
duplicate keys and tensor names; n_dims in 1..4, every dim > 0, element counts bounded; the tensor type
(F32, F16, BF16, TQ1_0, TQ2_0, I2_S, the DEQUANT_TYPES below, else "unsupported tensor type X in tensor Y"); the
byte size per type and shape; offsets that are multiples of the alignment and end inside the file; no two tensors
overlapping. Every failure is one GGUFFormatError naming the file, the field and its offset (or the tensor).

GGUFSource: a model under our canonical names
---------------------------------------------
``general.architecture`` ``bitnet-b1.58`` / ``bitnet-25`` (Microsoft bitnet.cpp, the 2B-4T graph: relu²,
sub-norms) or ``bitnet`` (upstream llama.cpp: the 1bitLLM graph: SiLU, sub-norms when present, optional
``blk.N.<linear>.scale`` F32 [1] tensors that multiply the weight). Config from the ``<arch>.*`` keys,
``token_embd`` doubles as the head when there is no ``output.weight``, and the tokenizer is rebuilt from
``tokenizer.ggml.*`` (see build_tokenizer).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from bitnet158.formats.packed import human_bytes, model_tensors, tokenizer_summary
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

logger = logging.getLogger(__name__)

# ggml type ids; gguf.GGMLQuantizationType has TQ1_0/TQ2_0 but not Microsoft's I2_S
GGML_TYPE_TQ1_0 = int(GGMLQuantizationType.TQ1_0)  # 34
GGML_TYPE_TQ2_0 = int(GGMLQuantizationType.TQ2_0)  # 35
GGML_TYPE_I2_S = 36

QK_I2_S = 128          # weights per I2_S block
I2S_BLOCK_BYTES = 32   # bytes per I2_S block
I2S_TAIL_BYTES = 32    # f32 scale + 28 filler bytes after the packed weights
QK_K, TQ2_0_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.TQ2_0]  # 256 weights in 66 bytes
TQ1_0_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.TQ1_0][1]     # 256 weights in 54 bytes


class GGUFFormatError(ValueError):
    """A GGUF file or a GGUF tensor payload is malformed, unsupported or inconsistent."""


# --------------------------------------------------------------------------------------------------
# helpers


def _as_u8(data, what: str) -> np.ndarray:
    """Any buffer / numpy array / CPU torch tensor of bytes -> flat uint8 numpy view (no copy when possible)."""
    if hasattr(data, "detach"):  # torch tensor: convert without importing torch here
        data = data.detach().cpu().numpy()
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise GGUFFormatError(f"{what}: expected uint8 data, got {data.dtype}")
        return np.ascontiguousarray(data).reshape(-1)
    return np.frombuffer(data, dtype=np.uint8)


def _check_shape(shape, what: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] <= 0 or shape[1] <= 0:
        raise GGUFFormatError(f"{what}: a ternary weight has a 2-D shape (out, in) with positive dims, got {shape}")
    return shape


def _t2_array(t2, shape: tuple[int, int], what: str) -> np.ndarray:
    out, n_in = shape
    arr = _as_u8(t2, what)
    rb = -(-n_in // 4)
    if arr.size != out * rb:
        raise GGUFFormatError(f"{what}: t2 data has {arr.size} bytes, shape {shape} needs {out * rb}")
    return arr.reshape(out, rb)


def _has_code3(packed: np.ndarray) -> bool:
    """True if any 2-bit field of the bytes is 3 (both bits set)."""
    return bool(np.any(packed & (packed >> 1) & 0x55))


def _interleaved_to_t2(blocks: np.ndarray, msb_first: bool) -> np.ndarray:
    """[nb, 32] bytes holding 128 weights (byte b: weights 32g + b, g = 0..3) -> [nb, 32] t2 bytes.

    I2_S puts weight 32g + b at bit 6 - 2g (msb_first), TQ2_0 halves at bit 2g. t2 byte j' holds weights
    4j' + k at bit 2k, i.e. group g = j' // 8 and source bytes b = 4(j' % 8) + k.
    """
    src = blocks.reshape(-1, 8, 4)  # [nb, m, k]: source byte b = 4m + k
    out = np.empty((blocks.shape[0], 4, 8), dtype=np.uint8)  # [nb, g, m]: t2 byte 8g + m
    for g in range(4):
        shift = 6 - 2 * g if msb_first else 2 * g
        f = (src >> shift) & 3  # [nb, m, k] the fields of group g
        out[:, g, :] = f[..., 0] | (f[..., 1] << 2) | (f[..., 2] << 4) | (f[..., 3] << 6)
    return out.reshape(-1, 32)


def _t2_to_interleaved(t2_blocks: np.ndarray, msb_first: bool) -> np.ndarray:
    """Inverse of _interleaved_to_t2: [nb, 32] t2 bytes -> [nb, 32] interleaved bytes."""
    src = t2_blocks.reshape(-1, 4, 8)  # [nb, g, m]
    out = np.zeros((t2_blocks.shape[0], 8, 4), dtype=np.uint8)  # [nb, m, k]
    for g in range(4):
        shift = 6 - 2 * g if msb_first else 2 * g
        for k in range(4):
            out[:, :, k] |= ((src[:, g, :] >> (2 * k)) & 3) << shift
    return out.reshape(-1, 32)


def _codes_to_t2(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [out, in] -> t2 [out, ceil(in/4)] (a row tail is padded with code 1, zero)."""
    out, n_in = codes.shape
    if n_in % 4:
        padded = np.ones((out, -(-n_in // 4) * 4), dtype=np.uint8)
        padded[:, :n_in] = codes
        codes = padded
    c = codes.reshape(out, -1, 4)
    return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)


def _t2_to_codes(t2: np.ndarray) -> np.ndarray:
    """t2 [out, rb] -> uint8 codes [out, 4 rb]."""
    codes = np.empty(t2.shape + (4,), dtype=np.uint8)
    for k in range(4):
        codes[..., k] = (t2 >> (2 * k)) & 3
    return codes.reshape(t2.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# I2_S


def i2s_nbytes(n_elements: int) -> int:
    """Byte size of an I2_S tensor of n weights: n/4 packed bytes + 32 (f32 scale + filler)."""
    return n_elements // 4 + I2S_TAIL_BYTES


def _check_i2s_shape(shape, what: str) -> tuple[int, int]:
    out, n_in = _check_shape(shape, what)
    if n_in % QK_I2_S:
        raise GGUFFormatError(f"{what}: I2_S rows must be a multiple of {QK_I2_S} weights, got shape {(out, n_in)}")
    return out, n_in


def i2s_to_t2(raw, shape) -> tuple[np.ndarray, float]:
    """Decode an I2_S payload (n/4 + 32 bytes) of logical shape (out, in) -> (t2 uint8 [out, in/4], scale).

    The scale is the stored f32 as a Python float (exact). Raises GGUFFormatError on a wrong size, a code 3,
    or a scale that is not finite and > 0.
    """
    out, n_in = _check_i2s_shape(shape, "I2_S")
    buf = _as_u8(raw, "I2_S")
    n = out * n_in
    if buf.size != i2s_nbytes(n):
        raise GGUFFormatError(f"I2_S: payload has {buf.size} bytes, shape {(out, n_in)} needs {i2s_nbytes(n)}")
    packed = buf[: n // 4]
    if _has_code3(packed):
        raise GGUFFormatError("I2_S: code 3 found in the packed weights (valid codes are 0, 1, 2)")
    scale = float(buf[n // 4 : n // 4 + 4].view("<f4")[0])
    if scale == 0:
        # an all-zero weight (bitnet.cpp's scale is max|W|): zero codes and any positive scale say the same
        return np.full((out, n_in // 4), 0x55, dtype=np.uint8), 1.0
    if not (np.isfinite(scale) and scale > 0):
        raise GGUFFormatError(f"I2_S: scale {scale} is not finite and > 0")
    t2 = _interleaved_to_t2(packed.reshape(-1, I2S_BLOCK_BYTES), msb_first=True)
    return t2.reshape(out, n_in // 4), scale


def t2_to_i2s(t2, shape, scale: float) -> bytes:
    """Encode t2 uint8 [out, in/4] with a per-tensor f32 scale as an I2_S payload (n/4 + 32 bytes)."""
    out, n_in = _check_i2s_shape(shape, "I2_S")
    arr = _t2_array(t2, (out, n_in), "I2_S")
    if _has_code3(arr):
        raise GGUFFormatError("I2_S: code 3 found in the t2 weights")
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0):
        raise GGUFFormatError(f"I2_S: scale {scale} is not finite and > 0")
    packed = _t2_to_interleaved(arr.reshape(-1, I2S_BLOCK_BYTES), msb_first=True)
    tail = np.zeros(I2S_TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.array([s], dtype="<f4").view(np.uint8)
    return packed.tobytes() + tail.tobytes()


# --------------------------------------------------------------------------------------------------
# TQ2_0 / TQ1_0


def _check_tq_shape(shape, what: str) -> tuple[int, int]:
    out, n_in = _check_shape(shape, what)
    if n_in % QK_K:
        raise GGUFFormatError(f"{what}: rows must be a multiple of {QK_K} weights, got shape {(out, n_in)}")
    return out, n_in


def _tq_blocks(raw, shape, block_bytes: int, what: str) -> tuple[np.ndarray, tuple[int, int]]:
    out, n_in = _check_tq_shape(shape, what)
    buf = _as_u8(raw, what)
    nblk = out * n_in // QK_K
    if buf.size != nblk * block_bytes:
        raise GGUFFormatError(f"{what}: payload has {buf.size} bytes, shape {(out, n_in)} needs {nblk * block_bytes}")
    return buf.reshape(nblk, block_bytes), (out, n_in)


def _block_d(d, nblk: int, exact: bool, what: str) -> np.ndarray:
    """Scalar or [nblk] block scales -> little-endian f16 [nblk]; exact=True refuses values f16 cannot hold."""
    d_arr = np.asarray(d.detach().cpu().numpy() if hasattr(d, "detach") else d)
    if d_arr.ndim == 0:
        d_arr = np.full(nblk, d_arr)
    d_arr = d_arr.reshape(-1)
    if d_arr.size != nblk:
        raise GGUFFormatError(f"{what}: {d_arr.size} block scales given, {nblk} blocks")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below with a clearer message
        d16 = d_arr.astype("<f2")
    if not np.all(np.isfinite(d16)) or np.any(d16 < 0):
        raise GGUFFormatError(f"{what}: a block scale is negative, or overflows or is not finite in f16")
    if exact and d_arr.dtype != np.float16 and np.any(d16.astype(np.float64) != d_arr.astype(np.float64)):
        bad = d_arr[d16.astype(np.float64) != d_arr.astype(np.float64)][0]
        raise GGUFFormatError(
            f"{what}: scale {float(bad)!r} is not representable in f16 (TQ block scales are f16); "
            "pass exact=False to round it"
        )
    return d16


def tq2_0_to_t2(raw, shape) -> tuple[np.ndarray, np.ndarray]:
    """Decode a TQ2_0 payload of logical shape (out, in) -> (t2 uint8 [out, in/4], d f16 [n/256]).

    The codes are carried bit for bit (dequant = d · t per block). Raises on a code 3.
    """
    blocks, (out, n_in) = _tq_blocks(raw, shape, TQ2_0_BLOCK_BYTES, "TQ2_0")
    qs = blocks[:, :64]
    if _has_code3(qs):
        raise GGUFFormatError("TQ2_0: code 3 found in the packed weights (valid codes are 0, 1, 2)")
    d = blocks[:, 64:66].copy().view("<f2").reshape(-1)
    t2 = _interleaved_to_t2(np.ascontiguousarray(qs).reshape(-1, 32), msb_first=False)
    return t2.reshape(out, n_in // 4), d


def t2_to_tq2_0(t2, shape, d, exact: bool = True) -> bytes:
    """Encode t2 uint8 [out, in/4] with block scales d (scalar or [n/256]) as a TQ2_0 payload (66 B/256 w)."""
    out, n_in = _check_tq_shape(shape, "TQ2_0")
    arr = _t2_array(t2, (out, n_in), "TQ2_0")
    if _has_code3(arr):
        raise GGUFFormatError("TQ2_0: code 3 found in the t2 weights")
    nblk = out * n_in // QK_K
    d16 = _block_d(d, nblk, exact, "TQ2_0")
    blocks = np.empty((nblk, TQ2_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :64] = _t2_to_interleaved(arr.reshape(-1, 32), msb_first=False).reshape(nblk, 64)
    blocks[:, 64:66] = d16.view(np.uint8).reshape(nblk, 2)
    return blocks.tobytes()


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _tq1_digits(q: np.ndarray, n_digits: int) -> np.ndarray:
    """bytes [nblk, m] -> base-3 digits [nblk, n_digits, m]: digit i = ((q · 3^i) mod 256) · 3 >> 8."""
    shifted = q[:, None, :] * _POW3[:n_digits, None]  # uint8 multiply wraps mod 256
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def tq1_0_to_t2(raw, shape) -> tuple[np.ndarray, np.ndarray]:
    """Decode a TQ1_0 payload of logical shape (out, in) -> (t2 uint8 [out, in/4], d f16 [n/256])."""
    blocks, (out, n_in) = _tq_blocks(raw, shape, TQ1_0_BLOCK_BYTES, "TQ1_0")
    nblk = blocks.shape[0]
    codes = np.concatenate(
        [
            _tq1_digits(blocks[:, 0:32], 5).reshape(nblk, 160),    # c[32i + j]
            _tq1_digits(blocks[:, 32:48], 5).reshape(nblk, 80),    # c[160 + 16i + j]
            _tq1_digits(blocks[:, 48:52], 4).reshape(nblk, 16),    # c[240 + 4i + j]
        ],
        axis=1,
    )
    d = blocks[:, 52:54].copy().view("<f2").reshape(-1)
    return _codes_to_t2(codes.reshape(out, n_in)), d


def _tq1_pack(codes: np.ndarray, n_digits: int) -> np.ndarray:
    """codes [nblk, n_digits, m] -> bytes [nblk, m]: v = Σ c_i 3^(4-i), stored as ceil(v·256/243)."""
    weights = np.array([81, 27, 9, 3, 1], dtype=np.uint16)[:n_digits, None]
    v = (codes.astype(np.uint16) * weights).sum(axis=1, dtype=np.uint16)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def t2_to_tq1_0(t2, shape, d, exact: bool = True) -> bytes:
    """Encode t2 uint8 [out, in/4] with block scales d (scalar or [n/256]) as a TQ1_0 payload (54 B/256 w)."""
    out, n_in = _check_tq_shape(shape, "TQ1_0")
    arr = _t2_array(t2, (out, n_in), "TQ1_0")
    if _has_code3(arr):
        raise GGUFFormatError("TQ1_0: code 3 found in the t2 weights")
    nblk = out * n_in // QK_K
    d16 = _block_d(d, nblk, exact, "TQ1_0")
    codes = _t2_to_codes(arr).reshape(nblk, QK_K)
    blocks = np.empty((nblk, TQ1_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[:, 0:32] = _tq1_pack(codes[:, :160].reshape(nblk, 5, 32), 5)
    blocks[:, 32:48] = _tq1_pack(codes[:, 160:240].reshape(nblk, 5, 16), 5)
    blocks[:, 48:52] = _tq1_pack(codes[:, 240:].reshape(nblk, 4, 4), 4)
    blocks[:, 52:54] = d16.view(np.uint8).reshape(nblk, 2)
    return blocks.tobytes()


# --------------------------------------------------------------------------------------------------
# block scales -> our scales


def block_scales_to_tensor_scale(d) -> float | None:
    """The one per-tensor scale that TQ block scales d [n/256] (f16) stand for, or None.

    Blocks whose d is 0 dequantize to zeros whatever their codes, so they are ignored (see
    fold_block_scales, which zeros their codes). Returns the common value of the other blocks as a Python
    float, or None when they differ, are negative/non-finite, or every block is 0.
    """
    d = np.asarray(d).reshape(-1).astype(np.float32)
    live = d[d != 0]
    if live.size == 0 or not np.all(np.isfinite(live)) or np.any(live < 0):
        return None
    if np.any(live != live[0]):
        return None
    return float(live[0])


def fold_block_scales(t2, d, shape) -> tuple[np.ndarray, np.ndarray]:
    """TQ codes + block scales -> (t2 [out, in/4], f32 scale [1] or [out]) with d·t == scale·t exactly.

    Blocks with d == 0 get their codes set to 0 (code 1), since they dequantize to zero. The remaining
    scales must be one per tensor (-> [1]) or one per row (-> [out]); per-block scales that vary inside
    a row cannot be expressed in our format and raise GGUFFormatError.
    """
    out, n_in = _check_tq_shape(shape, "TQ")
    arr = _t2_array(t2, (out, n_in), "TQ")
    bpr = n_in // QK_K
    d32 = np.asarray(d).reshape(-1).astype(np.float32)
    if d32.size != out * bpr:
        raise GGUFFormatError(f"TQ: {d32.size} block scales for {out * bpr} blocks")
    if not np.all(np.isfinite(d32)) or np.any(d32 < 0):
        raise GGUFFormatError("TQ: a block scale is negative or not finite")
    dead = d32 == 0
    if np.any(dead):
        arr = arr.copy()
        # each block is 64 t2 bytes of one row: zero (code 1 = 0b01 per field -> 0x55) the dead ones
        arr.reshape(out * bpr, 64)[dead] = 0x55
    tensor_scale = block_scales_to_tensor_scale(d32)
    if tensor_scale is not None:
        return arr, np.array([tensor_scale], dtype=np.float32)
    if np.all(dead):
        return arr, np.ones(1, dtype=np.float32)  # an all-zero weight: any positive scale
    rows = d32.reshape(out, bpr)
    row_scale = np.where(dead.reshape(out, bpr), 0, rows).max(axis=1)
    row_scale = np.where(row_scale == 0, 1.0, row_scale).astype(np.float32)  # all-zero rows: any scale > 0
    varies = ~dead.reshape(out, bpr) & (rows != row_scale[:, None])
    if np.any(varies):
        r = int(np.argwhere(varies)[0][0])
        seen = sorted(set(rows[r][~dead.reshape(out, bpr)[r]].tolist()))
        raise GGUFFormatError(
            f"TQ: block scales vary within row {r} ({seen[:4]}); only per-tensor or per-row scales can be carried over"
        )
    return arr, row_scale


def float_to_t2(w: np.ndarray) -> tuple[np.ndarray, float]:
    """A float weight [out, in] that is exactly c · t (t ternary, one c > 0) -> (t2, c); else GGUFFormatError.

    Converters that stop before quantizing (upstream convert_hf_to_gguf.py for BitNet, bitnet.cpp's f16
    intermediate) store such weights as F32/F16/BF16; the check is exact, so nothing is re-quantized.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise GGUFFormatError(f"a ternary weight is 2-D, got shape {w.shape}")
    a = np.abs(w)
    nz = a[a != 0]
    c = float(nz[0]) if nz.size else 1.0
    if not np.isfinite(c) or (nz.size and np.any(nz != nz[0])):
        raise GGUFFormatError("float weight is not ternary: its nonzero entries are not all ±c for one c")
    codes = (np.sign(w) + 1).astype(np.uint8)
    return _codes_to_t2(codes), c


# --------------------------------------------------------------------------------------------------
# GGUF container reading

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_HEADER_BYTES = 24          # magic, version, n_tensors, n_kv
_MIN_KV_BYTES = 8 + 1 + 4 + 1          # key length + a 1-byte key + value type + a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8   # name length + 1-byte name + n_dims + 1 dim + type + offset
_MAX_COUNT = 10_000_000     # tensors or KV pairs, whatever the file size
_MAX_NAME_BYTES = 256       # tensor names (ggml itself allows 63)
_MAX_KEY_BYTES = 65_535
_MAX_ARRAY_DEPTH = 4
_MAX_DIMS = 4
_MAX_ELEMENTS = 1 << 48     # bounds dims products before any size arithmetic

# GGUFValueType -> (struct format, byte size) of the fixed-size scalars
_VT = GGUFValueType
_U64 = struct.Struct("<Q")
_SCALARS = {
    _VT.UINT8: ("<B", 1), _VT.INT8: ("<b", 1), _VT.UINT16: ("<H", 2), _VT.INT16: ("<h", 2),
    _VT.UINT32: ("<I", 4), _VT.INT32: ("<i", 4), _VT.FLOAT32: ("<f", 4), _VT.BOOL: ("<?", 1),
    _VT.UINT64: ("<Q", 8), _VT.INT64: ("<q", 8), _VT.FLOAT64: ("<d", 8),
}

# the tensor types we read: float types -> (our dtype, bytes per element); anything else is refused by name
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: ("f32", 4), GGMLQuantizationType.F16: ("f16", 2), GGMLQuantizationType.BF16: ("bf16", 2),
}
# quantized float types read as f32 through gguf.quants.dequantize (embeddings and heads of quantized files)
_Q = GGMLQuantizationType
DEQUANT_TYPES = frozenset({
    _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q8_0, _Q.Q2_K, _Q.Q3_K, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K,
    _Q.IQ1_S, _Q.IQ1_M, _Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S, _Q.IQ4_NL, _Q.IQ4_XS,
})
DEQUANT_ROWS = 4096  # rows dequantized at a time: numpy's temporaries stay a few hundred MB at 2B-4T widths
_TERNARY_TYPES = {GGML_TYPE_TQ1_0: "TQ1_0", GGML_TYPE_TQ2_0: "TQ2_0", GGML_TYPE_I2_S: "I2_S"}


def _type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return _TERNARY_TYPES.get(ggml_type, str(ggml_type))


def tensor_nbytes(ggml_type: int, shape: tuple[int, ...], name: str = "?") -> int:
    """Byte size of a tensor of a supported ggml type and logical shape; GGUFFormatError otherwise."""
    n = 1
    for s in shape:
        n *= s
    if ggml_type in _FLOAT_TYPES:
        return n * _FLOAT_TYPES[ggml_type][1]
    if ggml_type in (GGML_TYPE_TQ1_0, GGML_TYPE_TQ2_0):
        if shape[-1] % QK_K:
            raise GGUFFormatError(
                f"tensor {name!r}: {_TERNARY_TYPES[ggml_type]} rows must be a multiple of {QK_K}, shape {shape}"
            )
        per = TQ1_0_BLOCK_BYTES if ggml_type == GGML_TYPE_TQ1_0 else TQ2_0_BLOCK_BYTES
        return n // QK_K * per
    if ggml_type == GGML_TYPE_I2_S:
        if shape[-1] % QK_I2_S:
            raise GGUFFormatError(f"tensor {name!r}: I2_S rows must be a multiple of {QK_I2_S}, shape {shape}")
        return i2s_nbytes(n)
    if ggml_type in DEQUANT_TYPES:
        block, per = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        if shape[-1] % block:
            raise GGUFFormatError(
                f"tensor {name!r}: {_type_name(ggml_type)} rows must be a multiple of {block}, shape {shape}"
            )
        return n // block * per
    raise GGUFFormatError(f"unsupported tensor type {_type_name(ggml_type)} in tensor {name!r}")


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; every error names the field and offset."""

    def __init__(self, buf, size: int):
        self.buf = buf
        self.size = size
        self.pos = 0

    def need(self, n: int, field: str) -> None:
        if n > self.size - self.pos:
            raise GGUFFormatError(
                f"truncated file: {field} at offset {self.pos} needs {n} bytes, {self.size - self.pos} left"
            )

    def scalar(self, vtype: int, field: str):
        fmt, n = _SCALARS[vtype]
        self.need(n, field)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, field: str) -> int:
        return self.scalar(_VT.UINT32, field)

    def u64(self, field: str) -> int:
        return self.scalar(_VT.UINT64, field)

    def string(self, field: str, max_len: int | None = None) -> str:
        at = self.pos
        n = self.u64(f"{field} length")
        if max_len is not None and n > max_len:
            raise GGUFFormatError(f"{field} at offset {at}: length {n} exceeds the limit of {max_len} bytes")
        self.need(n, field)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFFormatError(f"{field} at offset {at}: invalid UTF-8 ({e.reason})") from None

    def value(self, vtype: int, field: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(vtype, field)
        if vtype == _VT.STRING:
            return self.string(field)
        if vtype != _VT.ARRAY:
            raise GGUFFormatError(f"{field} at offset {self.pos}: unknown value type {vtype}")
        if depth >= _MAX_ARRAY_DEPTH:
            raise GGUFFormatError(f"{field} at offset {self.pos}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
        at = self.pos
        etype = self.u32(f"{field} element type")
        count = self.u64(f"{field} element count")
        if etype in _SCALARS:
            min_size = _SCALARS[etype][1]
        elif etype in (_VT.STRING, _VT.ARRAY):
            min_size = 8 if etype == _VT.STRING else 12  # a length / an element type + count
        else:
            raise GGUFFormatError(f"{field} at offset {at}: unknown array element type {etype}")
        # refuse before allocating: every element takes at least min_size bytes of what is left
        if count > (self.size - self.pos) // min_size:
            raise GGUFFormatError(
                f"{field} at offset {at}: array of {count} elements cannot fit in the {self.size - self.pos} "
                "bytes left in the file"
            )
        if etype in _SCALARS:
            arr = np.frombuffer(self.buf, dtype=_SCALARS[etype][0], count=count, offset=self.pos).copy()
            self.pos += count * min_size
            return arr
        if etype == _VT.STRING:
            return self._strings(count, field)
        return [self.value(etype, f"{field}[{i}]", depth + 1) for i in range(count)]

    def _strings(self, count: int, field: str) -> list[str]:
        """An array of strings; the hot path of a file (a vocabulary and its merges), so a tight loop."""
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out = []
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"{field}[{i}] length")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{field}[{i}]")
            try:
                out.append(buf[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise GGUFFormatError(f"{field}[{i}] at offset {pos}: invalid UTF-8 ({e.reason})") from None
            pos += n
        self.pos = pos
        return out


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file: name as in the file, ggml type, logical (row-major) shape, absolute
    file offset and byte size."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class GGUFFile:
    """A validated, memory-mapped GGUF file (v2/v3): metadata, tensor table, raw tensor bytes.

    Everything in the module docstring is checked on open, before any allocation sized by the file.
    """

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        if size < _HEADER_BYTES:
            raise GGUFFormatError(f"{self.path}: truncated file: {size} bytes, shorter than the {_HEADER_BYTES}-byte "
                                  "GGUF header")
        with open(self.path, "rb") as f:
            # ACCESS_COPY: a private mapping, so zero-copy tensors are writable views that never touch the file
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            self._parse(size)
        except GGUFFormatError as e:  # every header error names the file, as the packed reader's do
            self._mm.close()
            raise GGUFFormatError(f"{self.path}: {e}") from None
        except BaseException:
            self._mm.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._mm, size)
        c.need(4, "magic")
        magic = bytes(self._mm[0:4])
        if magic != GGUF_MAGIC:
            what = " (a bitnet158 packed file)" if bytes(self._mm[0:8]) == b"BN158PAK" else ""
            raise GGUFFormatError(f"not a GGUF file{what}: magic {magic!r} at offset 0, expected {GGUF_MAGIC!r}")
        c.pos = 4
        self.version = c.u32("version")
        swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
        if self.version not in GGUF_VERSIONS and swapped in GGUF_VERSIONS:
            raise GGUFFormatError("big-endian GGUF file (version byte-swapped at offset 4); only little-endian is read")
        if self.version not in GGUF_VERSIONS:
            raise GGUFFormatError(
                f"unsupported GGUF version {self.version} at offset 4; this reader reads versions {GGUF_VERSIONS}"
            )
        n_tensors = c.u64("n_tensors")
        n_kv = c.u64("n_kv")
        if n_kv > _MAX_COUNT or n_kv * _MIN_KV_BYTES > size - c.pos:
            raise GGUFFormatError(f"n_kv at offset 16: {n_kv} key/value pairs cannot fit in a {size}-byte file")
        if n_tensors > _MAX_COUNT or n_tensors * _MIN_TENSOR_INFO_BYTES > size - c.pos:
            raise GGUFFormatError(f"n_tensors at offset 8: {n_tensors} tensor infos cannot fit in a {size}-byte file")

        self.metadata: dict[str, object] = {}
        self.metadata_types: dict[str, int] = {}
        for i in range(n_kv):
            at = c.pos
            key = c.string(f"key of KV pair {i}", _MAX_KEY_BYTES)
            if not key:
                raise GGUFFormatError(f"key of KV pair {i} at offset {at} is empty")
            if key in self.metadata:
                raise GGUFFormatError(f"duplicate metadata key {key!r} at offset {at}")
            vtype = c.u32(f"value type of {key!r}")
            self.metadata[key] = c.value(vtype, f"value of {key!r}")
            self.metadata_types[key] = vtype

        self.alignment = DEFAULT_ALIGNMENT
        if Keys.General.ALIGNMENT in self.metadata:
            a = self.metadata[Keys.General.ALIGNMENT]
            if self.metadata_types[Keys.General.ALIGNMENT] != _VT.UINT32 or a <= 0 or a & (a - 1) or a > 1 << 20:
                raise GGUFFormatError(f"general.alignment must be a u32 power of two up to 2^20, got {a!r}")
            self.alignment = a

        infos = []
        names = set()
        for i in range(n_tensors):
            at = c.pos
            name = c.string(f"name of tensor {i}", _MAX_NAME_BYTES)
            if not name:
                raise GGUFFormatError(f"tensor {i} at offset {at} has an empty name")
            if name in names:
                raise GGUFFormatError(f"duplicate tensor name {name!r} at offset {at}")
            names.add(name)
            n_dims = c.u32(f"n_dims of tensor {name!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise GGUFFormatError(f"tensor {name!r} at offset {at}: n_dims {n_dims} is not in 1..{_MAX_DIMS}")
            dims = [c.u64(f"dim {d} of tensor {name!r}") for d in range(n_dims)]
            n = 1
            for d in dims:
                if d <= 0 or d >= 1 << 40:
                    raise GGUFFormatError(f"tensor {name!r} at offset {at}: dims {dims} must each be in 1..2^40")
                n *= d
                if n > _MAX_ELEMENTS:
                    raise GGUFFormatError(f"tensor {name!r} at offset {at}: {dims} holds too many elements")
            ggml_type = c.u32(f"type of tensor {name!r}")
            rel = c.u64(f"offset of tensor {name!r}")
            shape = tuple(reversed(dims))  # ggml dims[0] is the innermost axis
            nbytes = tensor_nbytes(ggml_type, shape, name)
            infos.append((name, ggml_type, shape, rel, nbytes))

        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        if self.data_offset > size and infos:
            raise GGUFFormatError(
                f"truncated file: the data section would start at {self.data_offset}, file is {size} bytes"
            )

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ggml_type, shape, rel, nbytes in infos:
            if rel % self.alignment:
                raise GGUFFormatError(
                    f"tensor {name!r}: data offset {rel} is not a multiple of the alignment {self.alignment}"
                )
            start = self.data_offset + rel
            if start + nbytes > size:
                raise GGUFFormatError(
                    f"tensor {name!r}: bytes [{start}, {start + nbytes}) run past the end of the {size}-byte file"
                )
            self.tensors[name] = GGUFTensorInfo(name, ggml_type, _type_name(ggml_type), shape, start, nbytes)

        ordered = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            if a.offset + a.nbytes > b.offset:
                raise GGUFFormatError(
                    f"tensors {a.name!r} [{a.offset}, {a.offset + a.nbytes}) and {b.name!r} "
                    f"[{b.offset}, {b.offset + b.nbytes}) overlap"
                )
        logger.debug("GGUF v%d %s: %d KV, %d tensors", self.version, self.path, n_kv, n_tensors)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a zero-copy uint8 view of the mapping."""
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def float_tensor(self, name: str):
        """F32/F16/BF16 tensor as a zero-copy torch view with its logical shape; a DEQUANT_TYPES tensor as a new
        f32 tensor (gguf.quants.dequantize, DEQUANT_ROWS rows at a time)."""
        import torch

        t = self.tensors[name]
        if t.ggml_type in DEQUANT_TYPES:
            from gguf.quants import dequantize

            cols = t.shape[-1]
            rows = int(np.prod(t.shape)) // cols
            raw = self.raw(name).reshape(rows, -1)  # [rows, bytes a row]: whole blocks (tensor_nbytes checked)
            out = torch.empty(t.shape, dtype=torch.float32)
            flat = out.view(rows, cols)
            qtype = GGMLQuantizationType(t.ggml_type)
            for i in range(0, rows, DEQUANT_ROWS):
                flat[i : i + DEQUANT_ROWS] = torch.from_numpy(dequantize(raw[i : i + DEQUANT_ROWS], qtype))
            return out
        if t.ggml_type not in _FLOAT_TYPES:
            raise GGUFFormatError(f"tensor {name!r} is {t.type_name}, not a float tensor")
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[_FLOAT_TYPES[t.ggml_type][0]]
        count = t.nbytes // _FLOAT_TYPES[t.ggml_type][1]
        return torch.frombuffer(self._mm, dtype=dtype, count=count, offset=t.offset).view(t.shape)

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:
            # views handed out are still alive; the mapping goes away with the last of them
            logger.debug("GGUF %s: mapping still referenced by tensor views; left to the garbage collector", self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------------------------------
# GGUFSource: a GGUF model under the read surface of PackedFile (canonical names, t2 + f32 scales)

# general.architecture -> (family, hidden_act, sub-norms required)
ARCH_2B4T = ("bitnet-b1.58", "bitnet-25")   # Microsoft bitnet.cpp: the 2B-4T graph, relu², sub-norms
ARCH_UPSTREAM = "bitnet"                     # upstream llama.cpp: the 1bitLLM graph, SiLU, tied head
SUPPORTED_ARCHS = ARCH_2B4T + (ARCH_UPSTREAM,)

# GGUF tensor name -> canonical name (PACKED.md §2.2); {i} is the layer
_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "attn_q.weight": "attn.q_proj.weight",
    "attn_k.weight": "attn.k_proj.weight",
    "attn_v.weight": "attn.v_proj.weight",
    "attn_sub_norm.weight": "attn.sub_norm.weight",
    "attn_output.weight": "attn.o_proj.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_sub_norm.weight": "mlp.sub_norm.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# upstream's optional per-tensor multipliers: blk.N.<linear>.scale, F32 [1]
_SCALE_SUFFIX = ".scale"

# Token texts on which llama.cpp ends generation in any GGUF, whatever its keys say (llama-vocab.cpp, as
# llama-cpp-python 0.3.36 vendors it; older releases know fewer). It also ends on the FIM pad, repo and file
# separator tokens, each the one token of these texts (where no tokenizer.ggml.fim_*_token_id key names one).
_FIM_EOG_TEXTS = (
    ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    ("<|file_sep|>",),
)
LLAMA_CPP_EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
)


def llama_cpp_eog_ids(tokens: list) -> list[int]:
    """The ids of ``tokens`` (the GGUF token list) that llama.cpp ends generation on by their text alone, in the
    order of LLAMA_CPP_EOG_TEXTS (so an export keys <|eot_id|> as eot, and <|eom_id|> as eom, as Llama-3 does),
    then the FIM ones."""
    texts = {*LLAMA_CPP_EOG_TEXTS, *(t for kind in _FIM_EOG_TEXTS for t in kind)}
    found = {}
    for i, t in enumerate(tokens):
        if t in texts and t not in found:
            found[t] = i
    ids = {t: found[t] for t in LLAMA_CPP_EOG_TEXTS if t in found}
    for kind in _FIM_EOG_TEXTS:  # llama.cpp takes one of a kind (its hash map's first): here the lowest id
        fim = min((found[t] for t in kind if t in found), default=None)
        if fim is not None:
            ids[tokens[fim]] = fim
    # its two exceptions: <|end|> continues a gpt-oss (or solar-open) turn, </s> is text to Gemma-4
    if ("<|call|>" in ids or "<|calls|>" in ids) and ("<|return|>" in ids or "<|flush|>" in ids):
        ids.pop("<|end|>", None)
    if "<|tool_response>" in ids:
        ids.pop("</s>", None)
    return list(ids.values())


# Microsoft's 2B-4T GGUF carries no chat template. This is the one of the HF repo (the ``chat_template`` of
# microsoft/bitnet-b1.58-2B-4T tokenizer_config.json, as quoted verbatim by other projects); it renders
# "User: {msg}<|eot_id|>Assistant: " like bitnet.cpp's built-in "bitnet" template. BOS is not in the
# template: the tokenizer's post-processor adds it.
BITNET_2B4T_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)

# The Llama-3 pre-tokenizer split (meta-llama/Meta-Llama-3-8B tokenizer.json; llama.cpp "llama-bpe").
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3", "falcon3")
_GPT2_PRE = ("gpt-2", "gpt2")
# llama.cpp's "default" split (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_DEFAULT, also what it takes for a file without
# tokenizer.ggml.pre): each regex splits the pieces the one before it left, matches and the text between them
# apart, as a sequence of tokenizers' isolated Splits does (the same ids as llama-cpp-python on 200 random texts)
DEFAULT_SPLIT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)
LLAMA3_VOCAB_SIZE = 128256
# llama.cpp's ids for a SentencePiece ("llama") vocabulary that names none (llama_vocab::load): <unk> <s> </s>
_SPM_DEFAULT_IDS = {Keys.Tokenizer.UNK_ID: 0, Keys.Tokenizer.BOS_ID: 1, Keys.Tokenizer.EOS_ID: 2}


def _default_id(metadata: dict, key: str) -> int | None:
    """The id a special token key stands for where a file lacks it, as llama.cpp reads it."""
    return _SPM_DEFAULT_IDS.get(key) if metadata.get(Keys.Tokenizer.MODEL) == "llama" else None

# llama.cpp token types (gguf.TokenType)
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 2, 3, 4, 5  # (6 byte: not read)


@dataclass(frozen=True)
class GGUFTensor:
    """A tensor of a GGUFSource under its canonical name: dtype "t2" (ternary linear) or "f32"/"f16"/"bf16"."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    gguf_name: str
    gguf_type: str


class GGUFSource:
    """A BitNet GGUF file with the read surface of PackedFile.

    Linear weights may be I2_S, TQ1_0, TQ2_0, or F32/F16/BF16 holding exact c · t values (checked when
    ``ternary()`` reads them); every other tensor is F32/F16/BF16 or a DEQUANT_TYPES type (read as f32).

    ``config`` (PACKED.md §3), ``tokenizer`` (§4, built on first access), ``tensors`` (canonical name ->
    GGUFTensor; no ``*_scale`` entries: scales come with ``ternary()``), ``torch(name)``, ``ternary(name)``,
    ``close()``. ``activation`` ("relu2" / "silu") overrides the architecture's activation, because
    Microsoft's converter labels 1bitLLM models ``bitnet-b1.58`` too.
    """

    def __init__(self, path, activation: str | None = None):
        if activation not in (None, "relu2", "silu"):
            raise GGUFFormatError(f"activation must be 'relu2' or 'silu', got {activation!r}")
        self.path = str(path)
        self._file = GGUFFile(path)
        try:
            self._build(activation)
        except BaseException:
            self._file.close()
            raise

    # -- metadata helpers

    def _meta(self, key: str, kinds, default=...):
        md = self._file.metadata
        if key not in md:
            if default is ...:
                raise GGUFFormatError(f"{self.path}: required metadata key {key!r} is missing")
            return default
        v = md[key]
        if isinstance(v, np.ndarray) or not isinstance(v, kinds) or isinstance(v, bool) and bool not in kinds:
            raise GGUFFormatError(f"{self.path}: metadata key {key!r} has an unexpected type {type(v).__name__}")
        return v

    def _positive(self, key: str, kinds, default=..., zero=None):
        # a length, or a constant that the network divides or exponentiates by: finite and > 0, or the file is
        # refused naming its key (not later, by the runtime's config check, naming a config field). ``zero``: what
        # a 0 reads as, where llama.cpp gives it a meaning
        v = self._meta(key, kinds, default)
        if v == 0 and zero is not None:
            return zero
        if not math.isfinite(v) or v <= 0:
            raise GGUFFormatError(f"{self.path}: metadata key {key!r} = {v} must be a positive number")
        return v

    def _map_names(self, arch: str, n_layers: int) -> None:
        """GGUF tensor names -> canonical names (PACKED.md §2.2); every tensor is used or refused."""
        self._gguf_name: dict[str, str] = {}
        self._extra_scale: dict[str, str] = {}  # canonical linear name -> its upstream ".scale" tensor
        for gname, info in self._file.tensors.items():
            canon = _GLOBAL_NAMES.get(gname)
            parts = gname.split(".", 2)
            in_layer = len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers
            if canon is None and in_layer:
                layer, rest = int(parts[1]), parts[2]
                if rest in _LAYER_NAMES:
                    canon = f"layers.{layer}.{_LAYER_NAMES[rest]}"
                elif arch == ARCH_UPSTREAM and rest.endswith(_SCALE_SUFFIX) and rest[: -len(_SCALE_SUFFIX)] in _LINEARS:
                    if info.ggml_type != GGMLQuantizationType.F32 or info.shape != (1,):
                        raise GGUFFormatError(f"tensor {gname!r} must be F32 [1], got {info.type_name} {info.shape}")
                    linear = _LAYER_NAMES[rest[: -len(_SCALE_SUFFIX)] + ".weight"]
                    self._extra_scale[f"layers.{layer}.{linear}"] = gname
                    continue
            if canon is None:
                raise GGUFFormatError(f"unexpected tensor {gname!r} for architecture {arch!r} in {self.path}")
            self._gguf_name[canon] = gname

    def _build(self, activation: str | None) -> None:
        f = self._file
        arch = self._meta(Keys.General.ARCHITECTURE, (str,))
        if arch not in SUPPORTED_ARCHS:
            raise GGUFFormatError(
                f"unsupported architecture {arch!r} in {self.path}; supported: {', '.join(SUPPORTED_ARCHS)}"
            )
        self.arch = arch
        a = arch + "."

        def K(key: str) -> str:
            return key.format(arch=arch)

        hidden = self._meta(K(Keys.LLM.EMBEDDING_LENGTH), (int,))
        n_layers = self._meta(K(Keys.LLM.BLOCK_COUNT), (int,))
        heads = self._meta(K(Keys.Attention.HEAD_COUNT), (int,))
        kv_heads = self._meta(K(Keys.Attention.HEAD_COUNT_KV), (int,), heads)
        for k, v in (("embedding_length", hidden), ("block_count", n_layers), ("attention.head_count", heads),
                     ("attention.head_count_kv", kv_heads)):
            if not 0 < v < 1 << 31:
                raise GGUFFormatError(f"{a}{k} = {v} is out of range")
        if heads % kv_heads:
            raise GGUFFormatError(f"{a}attention.head_count {heads} is not a multiple of head_count_kv {kv_heads}")
        if n_layers > len(f.tensors):  # a layer is 9 tensors or more: a lying count must not size the loops below
            raise GGUFFormatError(f"{a}block_count = {n_layers}, but the file holds only {len(f.tensors)} tensors")
        head_dim = self._meta(K(Keys.Attention.KEY_LENGTH), (int,), None) or hidden // heads

        self._map_names(arch, n_layers)

        vocab = f.tensors["token_embd.weight"].shape[0] if "token_embd.weight" in f.tensors else None
        if vocab is None:
            raise GGUFFormatError(f"{self.path}: tensor 'token_embd.weight' is missing")
        declared = self._meta(K(Keys.LLM.VOCAB_SIZE), (int,), None)
        if declared is not None and declared != vocab:
            raise GGUFFormatError(f"{a}vocab_size = {declared} but token_embd.weight has {vocab} rows")
        tokens = f.metadata.get(Keys.Tokenizer.LIST)
        if isinstance(tokens, list) and len(tokens) > vocab:
            raise GGUFFormatError(f"the tokenizer has {len(tokens)} tokens but token_embd.weight only {vocab} rows")
        inter = self._meta(K(Keys.LLM.FEED_FORWARD_LENGTH), (int,))
        has_sub = [f"layers.{i}.attn.sub_norm.weight" in self._gguf_name for i in range(n_layers)]
        has_sub += [f"layers.{i}.mlp.sub_norm.weight" in self._gguf_name for i in range(n_layers)]
        sub_norms = all(has_sub)
        if any(has_sub) and not sub_norms:
            raise GGUFFormatError(f"{self.path}: sub-norm tensors are present in some layers but not all")
        if arch in ARCH_2B4T and not sub_norms:
            raise GGUFFormatError(
                f"{self.path}: architecture {arch!r} needs attn_sub_norm and ffn_sub_norm in every layer"
            )
        tied = "lm_head.weight" not in self._gguf_name
        # the canonical tensors this config implies, as a packed file of it holds them (name → shape, ternary)
        expect = model_tensors({
            "hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab, "num_hidden_layers": n_layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "sub_norms": sub_norms, "tie_word_embeddings": tied,
        })  # fmt: skip

        self.tensors: dict[str, GGUFTensor] = {}
        for canon, (shape, linear) in expect.items():
            gname = self._gguf_name.get(canon)
            if gname is None:
                raise GGUFFormatError(f"{self.path}: tensor for {canon!r} is missing")
            info = f.tensors[gname]
            if info.shape != shape:
                raise GGUFFormatError(f"tensor {gname!r} has shape {info.shape}, expected {shape}")
            if linear and info.ggml_type in DEQUANT_TYPES:
                raise GGUFFormatError(
                    f"tensor {gname!r} is {info.type_name}: a linear weight must be ternary (I2_S, TQ1_0, TQ2_0) or "
                    "a float tensor of ternary values"
                )
            if not linear and info.ggml_type not in _FLOAT_TYPES and info.ggml_type not in DEQUANT_TYPES:
                raise GGUFFormatError(f"tensor {gname!r} is {info.type_name}; expected a float or quantized float type")
            # a quantized float tensor reads as f32 (float_tensor dequantizes it)
            dtype = "t2" if linear else _FLOAT_TYPES.get(info.ggml_type, ("f32",))[0]
            self.tensors[canon] = GGUFTensor(canon, dtype, shape, gname, info.type_name)

        act = activation or ("relu2" if arch in ARCH_2B4T else "silu")
        # the family names the graph: relu² + sub-norms is Microsoft's 2B-4T, SiLU + sub-norms is 1bitLLM
        family = "bitnet" if act == "relu2" else ("1bitllm" if sub_norms else "llama-bitnet")
        n_rot = self._meta(K(Keys.Rope.DIMENSION_COUNT), (int,), head_dim)
        if n_rot != head_dim:  # llama.cpp would rotate only the first n_rot dims of each head: another model
            raise GGUFFormatError(f"{a}rope.dimension_count = {n_rot}, but heads have {head_dim} dims: partial "
                                  "rotary embeddings are not supported")
        rope_scaling = None
        # as llama.cpp reads them: the type defaults to linear, the factor falls back to the old key
        # rope.scale_linear, and a factor of 0 is none (rope_freq_scale_train = 1)
        st = self._meta(K(Keys.Rope.SCALING_TYPE), (str,), "linear")
        factor_key = K(Keys.Rope.SCALING_FACTOR)
        factor_key = factor_key if factor_key in f.metadata else a + "rope.scale_linear"
        factor = self._positive(factor_key, (float, int), 1.0, zero=1.0)
        if st != "none" and not (st == "linear" and factor == 1.0):
            if st != "linear":
                raise GGUFFormatError(f"{self.path}: unsupported rope scaling type {st!r}")
            rope_scaling = {"rope_type": "linear", "factor": float(factor)}
        bos = self._meta(Keys.Tokenizer.BOS_ID, (int,), _default_id(f.metadata, Keys.Tokenizer.BOS_ID))
        if bos is not None and not 0 <= bos < vocab:
            raise GGUFFormatError(f"tokenizer.ggml.bos_token_id = {bos} is outside the vocabulary of {vocab}")
        self.config = {
            "family": family,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": n_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "max_position_embeddings": self._positive(K(Keys.LLM.CONTEXT_LENGTH), (int,)),
            "rope_theta": float(self._positive(K(Keys.Rope.FREQ_BASE), (float, int), 10000.0)),
            # bitnet.cpp and upstream llama.cpp both run these archs with NeoX rope on unpermuted q/k
            "rope_style": "neox",
            "rope_scaling": rope_scaling,
            "rms_norm_eps": float(self._positive(K(Keys.Attention.LAYERNORM_RMS_EPS), (float,))),
            "hidden_act": act,
            "sub_norms": sub_norms,
            "tie_word_embeddings": tied,
            "bos_token_id": bos,
            "eos_token_id": self._eos_ids(),
        }

    def _eos_ids(self) -> list[int]:
        ids = []
        for key in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID, Keys.Tokenizer.EOM_ID):
            v = self._meta(key, (int,), _default_id(self._file.metadata, key))
            if v is not None and not 0 <= v < self._file.tensors["token_embd.weight"].shape[0]:
                raise GGUFFormatError(f"{key} = {v} is outside the vocabulary")
            if v is not None and v not in ids:
                ids.append(v)
        # and, as llama.cpp, on the tokens whose text it knows as an end of generation: Microsoft's 2B-4T file
        # lists <|eot_id|>, which ends its chat turns, as neither eos nor eot
        tokens = self._file.metadata.get(Keys.Tokenizer.LIST)
        if isinstance(tokens, list):
            ids += [i for i in llama_cpp_eog_ids(tokens) if i not in ids]
        return ids

    def _chat_template(self) -> str | None:
        tmpl = self._meta(Keys.Tokenizer.CHAT_TEMPLATE, (str,), None)
        if tmpl is None and self.arch in ARCH_2B4T:  # Microsoft's file: its Llama-3 vocabulary, and no template
            tokens = self._file.metadata.get(Keys.Tokenizer.LIST)
            if isinstance(tokens, list) and len(tokens) == LLAMA3_VOCAB_SIZE and "<|eot_id|>" in tokens:
                return BITNET_2B4T_CHAT_TEMPLATE
        return tmpl

    # -- the read surface

    def torch(self, name: str):
        """A float tensor (F32/F16/BF16) as a zero-copy CPU view with its logical shape; a quantized one
        (DEQUANT_TYPES: Q4_K, Q6_K, Q8_0, …) as a new f32 tensor, dequantized by gguf.quants."""
        t = self._lookup(name)
        if t.dtype == "t2":
            raise GGUFFormatError(f"tensor {name!r} is ternary ({t.gguf_type}); use ternary()")
        return self._file.float_tensor(t.gguf_name)

    def ternary(self, name: str):
        """(t2 uint8 [out, ceil(in/4)], f32 scale [1] or [out]) as torch tensors; W = scale · t exactly.

        I2_S keeps its per-tensor scale; TQ block scales become one per tensor or per row (else an error).
        Upstream ``blk.N.*.scale`` multipliers are folded in (one f32 multiply).
        """
        import torch

        t = self._lookup(name)
        if t.dtype != "t2":
            raise GGUFFormatError(f"tensor {name!r} is {t.dtype}, not ternary")
        raw = self._file.raw(t.gguf_name)
        if t.gguf_type == "I2_S":
            t2, s = i2s_to_t2(raw, t.shape)
            scale = np.array([s], dtype=np.float32)
        elif t.gguf_type in ("F32", "F16", "BF16"):
            try:
                t2, s = float_to_t2(self._file.float_tensor(t.gguf_name).float().numpy())
            except GGUFFormatError as e:
                raise GGUFFormatError(f"tensor {t.gguf_name!r} ({t.gguf_type}): {e}") from None
            scale = np.array([s], dtype=np.float32)
        else:
            decode = tq2_0_to_t2 if t.gguf_type == "TQ2_0" else tq1_0_to_t2
            t2, d = decode(raw, t.shape)
            try:
                t2, scale = fold_block_scales(t2, d, t.shape)
            except GGUFFormatError as e:
                raise GGUFFormatError(f"tensor {t.gguf_name!r}: {e}") from None
        extra = self._extra_scale.get(name)
        if extra is not None:
            e = float(self._file.raw(extra).view("<f4")[0])
            if not (np.isfinite(e) and e > 0):
                raise GGUFFormatError(f"tensor {extra!r}: multiplier {e} is not finite and > 0")
            scale = (scale * np.float32(e)).astype(np.float32)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise GGUFFormatError(f"tensor {t.gguf_name!r}: scale is not finite and > 0")
        return torch.from_numpy(np.ascontiguousarray(t2)), torch.from_numpy(scale)

    def _lookup(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    @property
    def metadata(self) -> dict:
        """The raw GGUF key/value metadata."""
        return self._file.metadata

    @functools.cached_property
    def tokenizer(self) -> dict:
        """The tokenizer dict of PACKED.md §4, built from the GGUF metadata."""
        return build_tokenizer(self._file.metadata, self._chat_template())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def describe(path: str | os.PathLike, verify: bool = False) -> str:
    """Human-readable summary of a GGUF model file (``bitnet-convert inspect``), as formats.packed.describe is for
    a packed file: the header and ``general.*`` keys, the config and tokenizer bitnet158 runs it with, every
    tensor under its GGUF and canonical names, totals. With ``verify``, every tensor is decoded first (ternary
    codes and scales checked, quantized floats dequantized): GGUF has no checksums to compare."""
    with GGUFSource(path) as src:
        f = src._file
        if verify:
            for name, t in src.tensors.items():
                src.ternary(name) if t.dtype == "t2" else src.torch(name)
        size = os.path.getsize(src.path)
        lines = [f"{src.path}: GGUF version {f.version}, architecture {src.arch}, {human_bytes(size)} ({size} bytes)"]
        lines.append(f"metadata: {len(f.metadata)} keys")
        lines += [f"  {k}: {v}" for k, v in f.metadata.items()
                  if k.startswith("general.") and isinstance(v, (str, int, float))]  # fmt: skip
        lines.append("config (as bitnet158 runs it):")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in src.config.items()]
        lines.append("tokenizer:")
        lines += tokenizer_summary(src.tokenizer)
        canon = {t.gguf_name: t.name for t in src.tensors.values()}
        lines.append(f"tensors: {len(f.tensors)}")
        width = max(len(n) for n in f.tensors)
        lines.append(f"  {'name':<{width}}  {'type':<6}  {'shape':<16}  {'offset':>12}  {'nbytes':>12}  canonical name")
        for t in f.tensors.values():
            shape = "x".join(map(str, t.shape))
            lines.append(f"  {t.name:<{width}}  {t.type_name:<6}  {shape:<16}  {t.offset:>12}  {t.nbytes:>12}  "
                         f"{canon.get(t.name, '(scale multiplier)')}")  # fmt: skip
        t2 = [t for t in src.tensors.values() if t.dtype == "t2"]
        params = sum(t.shape[0] * t.shape[1] for t in t2)
        t2_bytes = sum(f.tensors[t.gguf_name].nbytes for t in t2)  # the block scales (I2_S: its 32-byte tail) included
        other = sum(math.prod(t.shape) for t in src.tensors.values() if t.dtype != "t2")
        lines.append("totals:")
        lines.append(f"  ternary params: {params:,} in {len(t2)} tensors, {human_bytes(t2_bytes)}")
        if params:
            lines.append(f"  bits per ternary weight (incl. scales): {8 * t2_bytes / params:.4f}")
        lines.append(f"  other params: {other:,}")
        if verify:
            lines.append("verify: OK (every tensor decodes: no code 3, scales finite and > 0)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# tokenizer from GGUF metadata


def _spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary: every split of a piece into two vocab pieces, best
    score first (ties: longer left piece, then longer right piece), as transformers' ``generate_merges``
    orders them, so that BPE reproduces SentencePiece's highest-score-first merging."""
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    # Splitting a piece costs its length squared (every split, each slice copied): one 400k-character token took
    # minutes. SentencePiece learns pieces of at most 512 characters (max_sentencepiece_length's limit), so only a
    # token added to the file by other means is longer: it gets no merges (llama.cpp would merge text into it). A
    # control or user-defined token is matched whole, without merges, anyway
    max_piece = 512
    long = [tok for tok in vocab if len(tok) > max_piece]
    if long:
        logger.warning("%d tokens are longer than %d characters (the first starts %r); text is never merged into "
                       "them (a control or user-defined one is still matched whole)", len(long), max_piece,
                       long[0][:20])  # fmt: skip
    merges = []
    for piece, score in zip(tokens, scores.tolist()):
        if len(piece) > max_piece:
            continue
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(m[0], m[1]) for m in merges]


def build_tokenizer(metadata: dict, chat_template: str | None = None) -> dict:
    """Build the PACKED.md §4 tokenizer dict from GGUF ``tokenizer.ggml.*`` metadata.

    - ``gpt2``: byte-level BPE from tokens + merges. The split regex comes from ``tokenizer.ggml.pre``:
      llama-bpe/llama3 -> the Llama-3 regex (and ``ignore_merges``, as Llama-3's tokenizer.json and
      llama.cpp do); gpt-2 -> the GPT-2 regex; default -> llama.cpp's four default regexes. Microsoft's 2B-4T
      file has no ``pre`` key: a 128256-token vocabulary with ``<|begin_of_text|>`` is taken to be llama-bpe (the
      Llama-3 tokenizer, where llama.cpp would take default); any other file without the key gets default, as
      in llama.cpp.
    - ``llama``: SentencePiece-style tokens/scores/types -> BPE with byte fallback and merges derived from
      the scores (as transformers' GGUF loader does), with llama.cpp's space handling: a "▁" prefix
      (``add_space_prefix``, default true) and spaces written as "▁".
    CONTROL tokens become special added tokens and USER_DEFINED ones plain added tokens, so they are matched
    whole. BOS/EOS insertion follows ``add_bos_token``/``add_eos_token`` (defaults: true for llama and for
    the Llama-3 vocabulary, false otherwise).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    def get(key, kinds, default=None):
        v = metadata.get(key, default)
        if v is not default and not isinstance(v, kinds):
            raise GGUFFormatError(f"metadata key {key!r} has an unexpected type {type(v).__name__}")
        return v

    kind = get(Keys.Tokenizer.MODEL, (str,))
    if kind is None:
        raise GGUFFormatError("the file carries no tokenizer (tokenizer.ggml.model is missing)")
    tokens = get(Keys.Tokenizer.LIST, (list,))
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFFormatError("tokenizer.ggml.tokens is missing or not an array of strings")
    n = len(tokens)
    types = get(Keys.Tokenizer.TOKEN_TYPE, (np.ndarray,))
    if types is not None and types.shape != (n,):
        raise GGUFFormatError(f"tokenizer.ggml.token_type has {types.size} entries for {n} tokens")
    types = types.astype(np.int64) if types is not None else np.full(n, _TOKEN_NORMAL)

    def token_id(key):
        v = get(key, (int,), _default_id(metadata, key))
        if v is not None and not 0 <= v < n:
            raise GGUFFormatError(f"{key} = {v} is not a token id (vocabulary of {n})")
        return v

    bos_id, eos_id = token_id(Keys.Tokenizer.BOS_ID), token_id(Keys.Tokenizer.EOS_ID)
    unk_id = token_id(Keys.Tokenizer.UNK_ID)
    pre = get(Keys.Tokenizer.PRE, (str,))
    add_eos = get(Keys.Tokenizer.ADD_EOS, (bool,), None)

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # llama.cpp keeps duplicates; the first id wins for encoding
    if len(vocab) != n:
        logger.warning("GGUF vocabulary has %d duplicate token strings; encoding uses the first id", n - len(vocab))

    if kind == "gpt2":
        merges_raw = get(Keys.Tokenizer.MERGES, (list,))
        if merges_raw is None:
            raise GGUFFormatError("a gpt2 tokenizer needs tokenizer.ggml.merges")
        merges = []
        for i, m in enumerate(merges_raw):
            parts = m.split(" ") if isinstance(m, str) else ()
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise GGUFFormatError(f"tokenizer.ggml.merges[{i}] = {m!r} is not two tokens separated by a space")
            # tokenizers' BPE refuses such a merge with a bare Exception: name the entry instead
            missing = next((t for t in (parts[0], parts[1], parts[0] + parts[1]) if t not in vocab), None)
            if missing is not None:
                raise GGUFFormatError(f"tokenizer.ggml.merges[{i}] = {m!r}: {missing!r} is not in the vocabulary")
            merges.append((parts[0], parts[1]))
        if pre is None and n == LLAMA3_VOCAB_SIZE and "<|begin_of_text|>" in vocab:
            logger.info("no tokenizer.ggml.pre; a %d-token vocabulary with <|begin_of_text|>: using the Llama-3 "
                        "pre-tokenizer", n)
            pre = "llama-bpe"
        if pre is None:
            logger.info("no tokenizer.ggml.pre: splitting as llama.cpp does then, with its 'default' regexes")
            pre = "default"
        llama3 = pre in _LLAMA3_PRE
        if not llama3 and pre not in (*_GPT2_PRE, "default"):
            raise GGUFFormatError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: "
                                  f"{', '.join(_LLAMA3_PRE + _GPT2_PRE)}, default")
        # UNUSED tokens (llama-quantize's and our [PADn] rows) decode to nothing in llama.cpp: left out of the
        # model's vocabulary, their ids decode to nothing here too (a merge that needs one keeps it)
        in_merges = {t for a, b in merges for t in (a, b, a + b)}
        bpe_vocab = {t: i for t, i in vocab.items() if types[i] != _TOKEN_UNUSED or t in in_merges}
        tok = Tokenizer(models.BPE(vocab=bpe_vocab, merges=merges, ignore_merges=llama3))
        if pre in _GPT2_PRE:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:  # a split, then ByteLevel's byte mapping alone
            regexes = [LLAMA3_SPLIT_REGEX] if llama3 else DEFAULT_SPLIT_REGEXES
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                *(pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ])
        tok.decoder = decoders.ByteLevel()
        add_bos = get(Keys.Tokenizer.ADD_BOS, (bool,), llama3)
    elif kind == "llama":
        scores = get(Keys.Tokenizer.SCORES, (np.ndarray,))
        if scores is None or scores.shape != (n,):
            raise GGUFFormatError("a llama tokenizer needs tokenizer.ggml.scores, one per token")
        unk = tokens[unk_id] if unk_id is not None else ("<unk>" if "<unk>" in vocab else None)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores.astype(np.float32)),
                                   unk_token=unk, fuse_unk=True, byte_fallback=True))
        prefix = get(Keys.Tokenizer.ADD_PREFIX, (bool,), True)
        # llama.cpp: a space before the text (and after each special token), every space written as "▁"
        steps = ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
        tok.normalizer = normalizers.Sequence(steps)
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
        add_bos = get(Keys.Tokenizer.ADD_BOS, (bool,), True)
    else:
        raise GGUFFormatError(f"unsupported tokenizer.ggml.model {kind!r}; supported: gpt2, llama")
    add_eos = bool(add_eos) if add_eos is not None else False

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i in np.flatnonzero((types == _TOKEN_CONTROL) | (types == _TOKEN_UNKNOWN)).tolist()
               if vocab[tokens[i]] == i]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i in np.flatnonzero(types == _TOKEN_USER_DEFINED).tolist() if vocab[tokens[i]] == i]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    bos_tok = tokens[bos_id] if bos_id is not None else None
    eos_tok = tokens[eos_id] if eos_id is not None else None
    if (add_bos and bos_tok is None) or (add_eos and eos_tok is None):
        raise GGUFFormatError("tokenizer asks to add BOS/EOS but the file gives no bos/eos token id")
    single, pair, specials = "$A:0", "$A:0 $B:1", []
    if add_bos:
        single, pair = f"{bos_tok}:0 {single}", f"{bos_tok}:0 $A:0 {bos_tok}:1 $B:1"
        specials.append((bos_tok, bos_id))
    if add_eos:
        single += f" {eos_tok}:0"
        pair = pair.replace("$A:0", f"$A:0 {eos_tok}:0") + f" {eos_tok}:1"
        if eos_tok != bos_tok:
            specials.append((eos_tok, eos_id))
    if add_bos or add_eos:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    return {
        "tokenizer_json": tok.to_str(),
        "chat_template": chat_template,
        "bos_token": bos_tok,
        "eos_token": eos_tok,
        "add_bos_token": bool(add_bos),
        "add_eos_token": add_eos,
    }
