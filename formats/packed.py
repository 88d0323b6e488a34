"""Reader and writer of the bitnet158 packed format, version 1.

The byte-level spec is ``formats/PACKED.md`` (shipped beside this module): a 32-byte preamble (magic
``BN158PAK``, u32 version 1, u32 flags 0, u64 header_len, u32 header_crc32, u32 reserved 0, little-endian), a
UTF-8 JSON header, zero padding, then tensor data with every tensor at a file offset that is a multiple of 64.
``t2`` tensors hold 2-bit ternary codes packed along the input dim (``formats/ternary.py``), each with a float32
scale tensor. This module is the only code that writes or reads these bytes; its constants are the spec's.

- :class:`PackedWriter` streams tensors into a temp file beside the target and renames it at ``close()``.
- :class:`PackedFile` memory-maps a file, validates everything in PACKED.md §7 on open and hands out zero-copy
  torch views; ``verify()`` checks the data CRCs and the t2 codes.
- :func:`describe` renders a file for ``bitnet-convert inspect``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import mmap
import operator
import os
import re
import secrets
import struct
import sys
import warnings
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from bitnet158.formats.config import ConfigError, ModelConfig, as_float

logger = logging.getLogger(__name__)

__all__ = [
    "MAGIC",
    "VERSION",
    "ALIGN",
    "PackedFormatError",
    "TensorSpec",
    "TensorInfo",
    "PackedWriter",
    "PackedFile",
    "describe",
    "model_tensors",
    "tensor_table_error",
    "tensor_nbytes",
]

# --- constants of PACKED.md ---------------------------------------------------------------------------------
MAGIC = b"BN158PAK"
VERSION = 1
ALIGN = 64
FORMAT_NAME = "bitnet158-packed"
# magic, version, flags, header_len, header_crc32, reserved
PREAMBLE = struct.Struct("<8sIIQII")
PREAMBLE_SIZE = PREAMBLE.size  # 32
MAX_HEADER_LEN = 64 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_NAME_BYTES = 256
MAX_NDIM = 4
MAX_DIM = 2**31 - 1
DTYPES = ("t2", "bf16", "f16", "f32")
GRANULARITIES = ("tensor", "row")
HEADER_KEYS = ("format", "version", "config", "tokenizer", "provenance", "tensors")
FAMILIES = ("bitnet", "1bitllm", "llama-bitnet")
ROPE_STYLES = ("neox",)
HIDDEN_ACTS = ("relu2", "silu")

_NAME_RE = re.compile(r"[A-Za-z0-9_.]{1,%d}" % MAX_NAME_BYTES, re.ASCII)
_SHA256_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "t2": torch.uint8}
# numpy has no bfloat16: bf16 data arrives as torch.bfloat16 only.
_NUMPY_DTYPE = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32), "t2": np.dtype(np.uint8)}
_CRC_PLACEHOLDER = 0xFFFFFFFF  # the widest crc32 in decimal, so the real header is never longer
_CHUNK = 16 * 1024 * 1024  # bytes per CRC / code-3 step in verify()

if sys.byteorder != "little":  # the format is little-endian and views are zero-copy
    raise ImportError("bitnet158.formats.packed needs a little-endian host")


class PackedFormatError(ValueError):
    """A packed file (or the data handed to the writer) breaks PACKED.md; the message names the field and offset."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor's data given its dtype and logical shape (PACKED.md §2)."""
    shape = tuple(shape)
    if dtype == "t2":
        out_f, in_f = shape
        return out_f * ((in_f + 3) // 4)
    return math.prod(shape) * _ITEMSIZE[dtype]


def model_tensors(config: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Canonical name → (logical shape, is ternary) of every tensor of a model of ``config`` (the §3 fields), in
    §2.2's order. The loader and the GGUF reader check a file against it; the random-model writer writes it."""
    d, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    out: dict[str, tuple[tuple[int, ...], bool]] = {"embed.weight": ((v, d), False)}
    for n in range(config["num_hidden_layers"]):
        p = f"layers.{n}."
        out[p + "attn_norm.weight"] = ((d,), False)
        out[p + "attn.q_proj.weight"] = ((q, d), True)
        out[p + "attn.k_proj.weight"] = ((kv, d), True)
        out[p + "attn.v_proj.weight"] = ((kv, d), True)
        if config["sub_norms"]:
            out[p + "attn.sub_norm.weight"] = ((q,), False)
        out[p + "attn.o_proj.weight"] = ((d, q), True)
        out[p + "mlp_norm.weight"] = ((d,), False)
        out[p + "mlp.gate_proj.weight"] = ((i, d), True)
        out[p + "mlp.up_proj.weight"] = ((i, d), True)
        if config["sub_norms"]:
            out[p + "mlp.sub_norm.weight"] = ((i,), False)
        out[p + "mlp.down_proj.weight"] = ((d, i), True)
    out["norm.weight"] = ((d,), False)
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = ((v, d), False)
    return out


def tensor_table_error(config: Mapping[str, Any], tensors: Mapping[str, Any]) -> str | None:
    """Why ``tensors`` (name → info with ``.shape`` and ``.dtype``: a packed file's or a GGUFSource's) are not the
    tensors of a model of ``config``, or None: one missing, one unexpected (beside the ternary ones' scales), or one
    of another shape or kind. The runtime loader and packed-to-gguf check a file with it before using it."""
    if config["num_hidden_layers"] > len(tensors):  # a layer is 9 tensors or more: a lying count must not size this
        return f"the config says {config['num_hidden_layers']} layers, but the file holds {len(tensors)} tensors"
    expected = model_tensors(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"tensor {missing[0]!r} is missing{more}; the file does not match its config"
    scales = {n + "_scale" for n, (_, ternary) in expected.items() if ternary}
    unknown = [n for n in tensors if n not in expected and n not in scales]
    if unknown:
        return f"unexpected tensor {unknown[0]!r} for a {config['family']} model with this config"
    for name, (shape, ternary) in expected.items():
        info = tensors[name]
        if tuple(info.shape) != shape:
            why = f" (vocab_size {config['vocab_size']})" if name in ("embed.weight", "lm_head.weight") else ""
            return f"tensor {name!r} has shape {tuple(info.shape)}, the config implies {shape}{why}"
        if (info.dtype == "t2") != ternary and info.dtype in ("t2", *_ITEMSIZE):  # (a GGUF's quantized floats too)
            return f"tensor {name!r} has dtype {info.dtype}, expected {'ternary' if ternary else 'a float tensor'}"
    return None


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer will hold: its logical shape (``[out, in]`` for t2) and, for t2, its scale tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: str | None = None
    scale_granularity: str | None = None

    def __post_init__(self) -> None:
        # Accept torch.Size, lists and numpy integers; anything else is left for validation to reject.
        dims = tuple(d if isinstance(d, bool) or not hasattr(d, "__index__") else operator.index(d) for d in self.shape)
        object.__setattr__(self, "shape", dims)


@dataclass(frozen=True)
class TensorInfo:
    """One validated entry of a file's tensor table."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32: int
    scale: str | None = None
    scale_granularity: str | None = None


# --- validation shared by reader and writer -----------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(as_float(v))


def _check_fields(obj: Any, where: str, fields: dict[str, tuple[str, Any]], err) -> None:
    """Checks that dict `obj` has every key of `fields` with a value passing its check; extra keys are allowed."""
    if not isinstance(obj, dict):
        raise err(f"{where} must be an object, got {type(obj).__name__}")
    for key, (kind, check) in fields.items():
        if key not in obj:
            raise err(f"{where} lacks the key {key!r}")
        if not check(obj[key]):
            raise err(f"{where}.{key} must be {kind}, got {obj[key]!r:.80}")


def _positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


_CONFIG_FIELDS = {
    "family": (f"one of {FAMILIES}", lambda v: v in FAMILIES),
    "hidden_size": ("a positive int", _positive_int),
    "intermediate_size": ("a positive int", _positive_int),
    "num_hidden_layers": ("a positive int", _positive_int),
    "num_attention_heads": ("a positive int", _positive_int),
    "num_key_value_heads": ("a positive int", _positive_int),
    "head_dim": ("a positive int", _positive_int),
    "vocab_size": ("a positive int", _positive_int),
    "max_position_embeddings": ("a positive int", _positive_int),
    "rope_theta": ("a positive number", lambda v: _is_number(v) and v > 0),
    "rope_style": (f"one of {ROPE_STYLES}", lambda v: v in ROPE_STYLES),
    "rope_scaling": ("an object or null", lambda v: v is None or isinstance(v, dict)),
    "rms_norm_eps": ("a positive number", lambda v: _is_number(v) and v > 0),
    "hidden_act": (f"one of {HIDDEN_ACTS}", lambda v: v in HIDDEN_ACTS),
    "sub_norms": ("a bool", lambda v: isinstance(v, bool)),
    "tie_word_embeddings": ("a bool", lambda v: isinstance(v, bool)),
    "bos_token_id": ("an int >= 0 or null", lambda v: v is None or (_is_int(v) and v >= 0)),
    "eos_token_id": ("a list of ints >= 0", lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)),
}
_TOKENIZER_FIELDS = {
    "tokenizer_json": ("a string", lambda v: isinstance(v, str)),
    "chat_template": ("a string or null", _opt_str),
    "bos_token": ("a string or null", _opt_str),
    "eos_token": ("a string or null", _opt_str),
    "add_bos_token": ("a bool", lambda v: isinstance(v, bool)),
    "add_eos_token": ("a bool", lambda v: isinstance(v, bool)),
}
_PROVENANCE_FIELDS = {
    "source": ("a string", lambda v: isinstance(v, str)),
    "revision": ("a string or null", _opt_str),
    "files": (
        "an object of file name -> lowercase hex SHA-256",
        lambda v: isinstance(v, dict) and all(isinstance(h, str) and _SHA256_RE.fullmatch(h) for h in v.values()),
    ),
    "converter": ("a string", lambda v: isinstance(v, str)),
    "created": ("a string", lambda v: isinstance(v, str)),
}


def _check_meta(config: Any, tokenizer: Any, provenance: Any, err, where: str) -> None:
    _check_fields(config, f"{where}config", _CONFIG_FIELDS, err)
    _check_fields(tokenizer, f"{where}tokenizer", _TOKENIZER_FIELDS, err)
    special = tokenizer.get("special_tokens", {})  # optional (files before it lack it)
    if not isinstance(special, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in special.items()):
        raise err(f"{where}tokenizer.special_tokens must be an object of strings, got {special!r:.80}")
    _check_fields(provenance, f"{where}provenance", _PROVENANCE_FIELDS, err)


def _check_spec(name: Any, dtype: Any, shape: Any, scale: Any, gran: Any, where: str) -> None:
    """Checks one tensor's name, dtype, shape and scale fields (not the scale's target) per PACKED.md §2."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PackedFormatError(f"{where}: malformed tensor name {name!r:.300} (1..256 chars of [A-Za-z0-9_.])")
    if dtype not in DTYPES:
        raise PackedFormatError(f"{where} {name!r}: unknown dtype {dtype!r:.40} (known: {', '.join(DTYPES)})")
    if (
        not isinstance(shape, (list, tuple))
        or not 1 <= len(shape) <= MAX_NDIM
        or not all(_is_int(d) and 1 <= d <= MAX_DIM for d in shape)
    ):
        raise PackedFormatError(
            f"{where} {name!r}: bad shape {shape!r:.80} (1 to {MAX_NDIM} dims, each 1..2^31-1)"
        )
    if dtype == "t2":
        if len(shape) != 2:
            raise PackedFormatError(f"{where} {name!r}: a t2 tensor must be 2-D [out, in], got shape {list(shape)}")
        if not isinstance(scale, str):
            raise PackedFormatError(f"{where} {name!r}: a t2 tensor needs a 'scale' naming its f32 scale tensor")
        if gran not in GRANULARITIES:
            raise PackedFormatError(
                f"{where} {name!r}: unknown scale_granularity {gran!r:.40} (known: {', '.join(GRANULARITIES)})"
            )
    elif scale is not None or gran is not None:
        raise PackedFormatError(f"{where} {name!r}: only t2 tensors take 'scale' and 'scale_granularity'")


def _check_scales(entries: dict[str, Any], where: str) -> None:
    """Checks that each t2 entry's scale names an f32 tensor of shape [1] (tensor) or [out] (row)."""
    for name, e in entries.items():
        if e.dtype != "t2":
            continue
        s = entries.get(e.scale)
        if s is None or s.dtype != "f32":
            raise PackedFormatError(f"{where} {name!r}: its scale {e.scale!r} names no f32 tensor in the file")
        want = (1,) if e.scale_granularity == "tensor" else (e.shape[0],)
        if tuple(s.shape) != want:
            raise PackedFormatError(
                f"{where} {name!r}: scale {e.scale!r} has shape {list(s.shape)}, "
                f"scale_granularity {e.scale_granularity!r} needs {list(want)}"
            )


def _reject_constant(c: str):
    raise ValueError(f"{c} is not JSON (RFC 8259)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return d


def _header_bytes(config: dict, tokenizer: dict, provenance: dict, entries: list[dict]) -> bytes:
    header = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "config": config,
        "tokenizer": tokenizer,
        "provenance": provenance,
        "tensors": entries,
    }
    return json.dumps(header, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


# --- writer -------------------------------------------------------------------------------------------------


def _remove_quietly(fd: int | None, path: str) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class PackedWriter:
    """Writes a packed file. The tensor table is fixed up front, tensors arrive one at a time in any order.

    Data goes to a temp file beside `path`; ``close()`` writes the header (with the data CRCs) into the space
    reserved for it, fsyncs and renames the temp file to `path`. On an exception inside a ``with`` block, on
    ``abort()``, or when a declared tensor was never written, the temp file is removed and `path` is untouched.
    A full disk raises one ``OSError`` (errno ENOSPC) naming the target, and leaves nothing behind.

    Args:
        path: the file to create; refused if it exists unless ``overwrite=True``.
        config, tokenizer, provenance: the header objects of PACKED.md §3-5 (checked here, as a reader would;
            the config also as the runtime checks it, formats/config.py).
        tensors: every tensor of the file, in file order; each t2 spec names its f32 scale spec.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        config: dict,
        tokenizer: dict,
        provenance: dict,
        tensors: list[TensorSpec],
        overwrite: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self._overwrite = overwrite
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory")
        if os.path.lexists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} exists; refusing to overwrite it (use --force / overwrite=True)")

        # Round-trip the metadata through JSON so that we check exactly what a reader will see.
        try:
            meta = json.loads(json.dumps([config, tokenizer, provenance], allow_nan=False))
        except (TypeError, ValueError) as e:
            raise PackedFormatError(f"config/tokenizer/provenance are not JSON-serializable: {e}") from e
        self._config, self._tokenizer, self._provenance = meta
        _check_meta(self._config, self._tokenizer, self._provenance, PackedFormatError, "")
        # The runtime's own validation of the config (bounds, rope_scaling, token ids): every writer (hf-to-packed,
        # gguf-to-packed, random models) then cannot write a file that the runtime refuses to load.
        try:
            ModelConfig.from_dict(self._config)
        except ConfigError as e:
            raise PackedFormatError(str(e)) from e

        if not tensors:
            raise PackedFormatError("the tensor table is empty")
        if len(tensors) > MAX_TENSORS:
            raise PackedFormatError(f"{len(tensors)} tensors, more than {MAX_TENSORS}")
        specs: dict[str, TensorSpec] = {}
        for i, s in enumerate(tensors):
            _check_spec(s.name, s.dtype, s.shape, s.scale, s.scale_granularity, f"tensor spec {i}")
            if s.name in specs:
                raise PackedFormatError(f"tensor spec {i}: duplicate name {s.name!r}")
            specs[s.name] = s
        _check_scales(specs, "tensor spec")
        self._specs = specs
        self._scale_names = {s.scale for s in specs.values() if s.dtype == "t2"}

        # Offsets depend on the header length, which depends on the offsets' digits: grow the data start until
        # the header (with max-width CRC placeholders) fits before it. Offsets only grow, so this converges.
        data_start = _align(PREAMBLE_SIZE)
        while True:
            offsets, pos = {}, data_start
            for s in specs.values():
                offsets[s.name] = pos
                pos = _align(pos + tensor_nbytes(s.dtype, s.shape))
            reserved = _header_bytes(*meta, self._entries(offsets, {}))
            if _align(PREAMBLE_SIZE + len(reserved)) <= data_start:
                break
            data_start = _align(PREAMBLE_SIZE + len(reserved))
        if len(reserved) > MAX_HEADER_LEN:
            raise PackedFormatError(f"the header is {len(reserved)} bytes, more than {MAX_HEADER_LEN}")
        self._offsets = offsets
        self._header_len = len(reserved)
        self._data_start = data_start
        last = list(specs.values())[-1]
        self._size = offsets[last.name] + tensor_nbytes(last.dtype, last.shape)
        self._crcs: dict[str, int] = {}

        fd, self._tmp = create_temp_beside(self.path)
        self._fd: int | None = fd
        # If the writer is dropped without close()/abort(), the temp file still goes away.
        self._finalizer = weakref.finalize(self, _remove_quietly, self._fd, self._tmp)
        try:
            self._reserve()
        except BaseException:
            self.abort()
            raise
        logger.debug("writing %s: %d tensors, %d bytes, data at %d", self.path, len(specs), self._size, data_start)

    @staticmethod
    def _entries_from(specs: Iterable[TensorSpec], offsets: dict[str, int], crcs: dict[str, int]) -> list[dict]:
        entries = []
        for s in specs:
            e = {
                "name": s.name,
                "dtype": s.dtype,
                "shape": list(s.shape),
                "offset": offsets[s.name],
                "nbytes": tensor_nbytes(s.dtype, s.shape),
                "crc32": crcs.get(s.name, _CRC_PLACEHOLDER),
            }
            if s.dtype == "t2":
                e["scale"] = s.scale
                e["scale_granularity"] = s.scale_granularity
            entries.append(e)
        return entries

    def _entries(self, offsets: dict[str, int], crcs: dict[str, int]) -> list[dict]:
        return self._entries_from(self._specs.values(), offsets, crcs)

    def _disk_full(self, e: OSError) -> OSError:
        return OSError(
            errno.ENOSPC,
            f"no space left on the device while writing {self.path} ({self._size} bytes needed); nothing was written",
        )

    def _reserve(self) -> None:
        """Allocates the whole file up front, so a full disk shows up now rather than half way through."""
        try:
            os.posix_fallocate(self._fd, 0, self._size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._disk_full(e) from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            # The filesystem cannot preallocate: size the file instead; the gaps read as zeros.
            os.ftruncate(self._fd, self._size)
        except AttributeError:  # no posix_fallocate on this platform
            os.ftruncate(self._fd, self._size)

    def _pwrite(self, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._disk_full(e) from e
            raise

    def write(self, name: str, data: np.ndarray | torch.Tensor) -> None:
        """Writes one declared tensor: t2 as ``uint8 [out, ceil(in/4)]``, floats in their dtype and logical shape.

        bf16 data must be a ``torch.bfloat16`` tensor (numpy has no bfloat16). Scale tensors must be finite and
        > 0; t2 bytes must hold no code 3 and pad each row with code 1. Any error aborts the writer (the temp
        file is removed).
        """
        if self._fd is None:
            raise PackedFormatError(f"{self.path}: the writer is closed")
        try:
            self._write(name, data)
        except BaseException:
            self.abort()
            raise

    def _write(self, name: str, data: np.ndarray | torch.Tensor) -> None:
        spec = self._specs.get(name)
        if spec is None:
            raise PackedFormatError(f"tensor {name!r} is not in the tensor table")
        if name in self._crcs:
            raise PackedFormatError(f"tensor {name!r} was already written")
        shape = spec.shape if spec.dtype != "t2" else (spec.shape[0], (spec.shape[1] + 3) // 4)
        if isinstance(data, torch.Tensor):
            if data.dtype != _TORCH_DTYPE[spec.dtype]:
                raise PackedFormatError(f"tensor {name!r} ({spec.dtype}): got torch dtype {data.dtype}")
            if tuple(data.shape) != shape:
                raise PackedFormatError(f"tensor {name!r}: got shape {list(data.shape)}, expected {list(shape)}")
            t = data.detach().to("cpu").contiguous()
            # Reinterpret as bytes: a view, and the only way out for bf16 (numpy has no bfloat16).
            arr = t.reshape(-1).view(torch.uint8).numpy()
        elif isinstance(data, np.ndarray):
            want = _NUMPY_DTYPE.get(spec.dtype)
            if want is None or data.dtype.newbyteorder("=") != want:
                raise PackedFormatError(
                    f"tensor {name!r} ({spec.dtype}): got numpy dtype {data.dtype}"
                    + ("; pass bf16 as a torch.bfloat16 tensor" if spec.dtype == "bf16" else "")
                )
            if tuple(data.shape) != shape:
                raise PackedFormatError(f"tensor {name!r}: got shape {list(data.shape)}, expected {list(shape)}")
            arr = np.ascontiguousarray(data, dtype=want.newbyteorder("<")).reshape(-1).view(np.uint8)
        else:
            raise PackedFormatError(
                f"tensor {name!r}: expected a numpy array or torch tensor, got {type(data).__name__}"
            )

        if spec.dtype == "t2":
            bad = _t2_problem(arr.reshape(shape), spec.shape[1])
            if bad is not None:
                raise PackedFormatError(f"tensor {name!r}: {bad}")
        if name in self._scale_names and not _scales_ok(arr):
            raise PackedFormatError(f"scale tensor {name!r}: every scale must be finite and > 0")

        raw = memoryview(arr).cast("B")
        assert raw.nbytes == tensor_nbytes(spec.dtype, spec.shape)
        self._pwrite(raw, self._offsets[name])
        self._crcs[name] = zlib.crc32(raw)

    def close(self) -> None:
        """Writes the header, fsyncs and renames the temp file to the target. Raises if a tensor is missing."""
        if self._fd is None:
            return
        try:
            missing = [n for n in self._specs if n not in self._crcs]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise PackedFormatError(f"{self.path}: tensors never written: {', '.join(missing[:5])}{more}")
            entries = self._entries(self._offsets, self._crcs)
            header = _header_bytes(self._config, self._tokenizer, self._provenance, entries)
            # JSON allows trailing whitespace: pad to the reserved length so header_len and the offsets stand.
            # (Only the CRCs changed since the reservation, and the placeholders were the widest.)
            assert len(header) <= self._header_len
            header += b" " * (self._header_len - len(header))
            pre = PREAMBLE.pack(MAGIC, VERSION, 0, len(header), zlib.crc32(header), 0)
            self._pwrite(pre + header + bytes(self._data_start - PREAMBLE_SIZE - len(header)), 0)
            try:
                os.fsync(self._fd)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise self._disk_full(e) from e
                raise
            os.close(self._fd)
            self._fd = None
            if not self._overwrite and os.path.lexists(self.path):  # appeared while we were writing
                raise FileExistsError(f"{self.path} exists; refusing to overwrite it (use --force / overwrite=True)")
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._finalizer.detach()
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        logger.info("wrote %s (%d tensors, %d bytes)", self.path, len(self._specs), self._size)

    def abort(self) -> None:
        """Removes the temp file; the target is left as it was."""
        fd, self._fd = self._fd, None
        self._finalizer.detach()
        _remove_quietly(fd, self._tmp)

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def output_folder_error(path: str | os.PathLike) -> OSError | None:
    """The error to raise for output ``path`` when its folder is missing or is not a folder, else None: said of
    the output, not of the temp file that could not be made beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return None
    if os.path.exists(directory):
        return NotADirectoryError(errno.ENOTDIR, f"{directory} is not a folder", os.fspath(path))
    return FileNotFoundError(errno.ENOENT, f"the folder {directory} does not exist", os.fspath(path))


def create_temp_beside(path: str | os.PathLike) -> tuple[int, str]:
    """A new temp file beside ``path`` for an output written whole and renamed over ``path`` at the end: (a
    write-only fd, its path ``.NAME.XXXXXXXX.tmp``). Created with mode 0666 less the umask, so the renamed file
    gets the permissions of any new file (tempfile.mkstemp's 0600 would stick to it)."""
    error = output_folder_error(path)
    if error is not None:
        raise error
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable; a filesystem that refuses to fsync a directory only weakens
    durability, so nothing is raised."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# t2 padding: with k = in % 4 weights in the last byte of a row, fields k..3 must hold code 1.
_PAD_PATTERN = {1: 0b010101, 2: 0b0101, 3: 0b01}


def _scales_ok(raw: np.ndarray) -> bool:
    """True if the f32 scales in `raw` (uint8 bytes) are all finite and > 0."""
    values = raw.view("<f4")
    return bool(np.isfinite(values).all() and (values > 0).all())


def _code3_index(b: np.ndarray) -> int | None:
    """Index of the first byte of `b` (uint8, flat) with a 2-bit field equal to 3, or None."""
    # A field is 3 exactly when both of its bits are set: bit 2k of (b & b >> 1) for some k.
    hits = np.flatnonzero(b & (b >> 1) & 0x55)
    return int(hits[0]) if hits.size else None


def _t2_problem(packed: np.ndarray, in_features: int, base: int | None = None) -> str | None:
    """Describes what is wrong with t2 bytes ``uint8 [out, rb]`` (code 3, or padding codes other than 1).

    `base` is the tensor's file offset, to name the bad byte's offset; without it the byte's index is named.
    """
    i = _code3_index(packed.reshape(-1))
    if i is not None:
        at = f"byte {i}" if base is None else f"byte at offset {base + i}"
        return f"code 3 in {at} (row {i // packed.shape[1]})"
    k = in_features % 4
    if k:
        tail = packed[:, -1] >> (2 * k)
        bad = np.flatnonzero(tail != _PAD_PATTERN[k])
        if bad.size:
            return f"row {int(bad[0])} pads past in={in_features} with codes other than 1 (zero)"
    return None


# --- reader -------------------------------------------------------------------------------------------------


class PackedFile:
    """A packed file opened read-only through mmap; every rule of PACKED.md §7 but the CRCs is checked on open.

    Attributes: ``path``, ``config``, ``tokenizer``, ``provenance`` (dicts from the header), ``tensors``
    (name -> :class:`TensorInfo`, in file order), ``header_len``, ``size`` (file bytes).

    Views from ``torch()`` and ``ternary()`` share the mapped memory: never write into them. After ``close()``
    a view still alive keeps the mapping alive until it is dropped.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._mm: mmap.mmap | None = None
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pre = f.read(PREAMBLE_SIZE)
            self._check_preamble(pre, size)
            # Preamble checks passed: header_len <= 64 MiB and fits in the file.
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = size
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _err(self, msg: str) -> PackedFormatError:
        return PackedFormatError(f"{self.path}: {msg}")

    def _check_preamble(self, pre: bytes, size: int) -> None:
        if size < PREAMBLE_SIZE or len(pre) < PREAMBLE_SIZE:
            raise self._err(f"file is {size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble")
        magic, version, flags, header_len, header_crc, reserved = PREAMBLE.unpack(pre)
        if magic != MAGIC:
            gguf = magic[:4] == b"GGUF"  # what a tool that takes packed files only is most often handed instead
            hint = "; it is a GGUF file: bitnet-run reads it as it is, bitnet-convert gguf-to-packed converts it"
            raise self._err(f"wrong magic {magic!r} at offset 0 (expected {MAGIC!r}): not a bitnet158 packed file"
                            f"{hint if gguf else ''}")  # fmt: skip
        if version != VERSION:
            raise self._err(f"version {version} at offset 8: this reader reads version {VERSION} only")
        if flags != 0:
            raise self._err(f"flags {flags:#x} at offset 12 must be 0")
        if reserved != 0:
            raise self._err(f"reserved field {reserved:#x} at offset 28 must be 0")
        if header_len > MAX_HEADER_LEN:
            raise self._err(f"header_len {header_len} at offset 16 is larger than {MAX_HEADER_LEN} (64 MiB)")
        if PREAMBLE_SIZE + header_len > size:
            raise self._err(
                f"header_len {header_len} at offset 16 runs past the end of the file ({size} bytes)"
            )
        self.version = version
        self.header_len = header_len
        self._header_crc = header_crc

    def _parse_header(self) -> None:
        raw = self._mm[PREAMBLE_SIZE : PREAMBLE_SIZE + self.header_len]
        crc = zlib.crc32(raw)
        if crc != self._header_crc:
            raise self._err(
                f"header CRC mismatch: header_crc32 at offset 24 is {self._header_crc:#010x}, "
                f"the {self.header_len} header bytes at offset {PREAMBLE_SIZE} give {crc:#010x}"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._err(f"header is not UTF-8 at offset {PREAMBLE_SIZE + e.start}") from None
        try:
            header = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
        except RecursionError:
            raise self._err("header JSON nests too deeply") from None
        except ValueError as e:
            where = f" at offset {PREAMBLE_SIZE + len(text[: e.pos].encode())}" if hasattr(e, "pos") else ""
            raise self._err(f"header is not valid JSON{where}: {getattr(e, 'msg', e)}") from None
        where = f"header (offset {PREAMBLE_SIZE})"
        if not isinstance(header, dict):
            raise self._err(f"{where} must be a JSON object")
        for key in HEADER_KEYS:
            if key not in header:
                raise self._err(f"{where} lacks the key {key!r}")
        extra = sorted(set(header) - set(HEADER_KEYS))
        if extra:
            raise self._err(f"{where} has unknown top-level keys {extra}")
        if header["format"] != FORMAT_NAME:
            raise self._err(f"{where}: format is {header['format']!r:.40}, expected {FORMAT_NAME!r}")
        if not _is_int(header["version"]) or header["version"] != self.version:
            raise self._err(f"{where}: version {header['version']!r:.40} differs from the preamble's {self.version}")
        try:
            _check_meta(header["config"], header["tokenizer"], header["provenance"], PackedFormatError, "")
        except PackedFormatError as e:
            raise self._err(f"{where}: {e}") from None
        self.config: dict = header["config"]
        self.tokenizer: dict = header["tokenizer"]
        self.provenance: dict = header["provenance"]
        self.tensors: dict[str, TensorInfo] = self._parse_tensors(header["tensors"])

    def _parse_tensors(self, table: Any) -> dict[str, TensorInfo]:
        if not isinstance(table, list):
            raise self._err("header: 'tensors' must be an array")
        if len(table) > MAX_TENSORS:
            raise self._err(f"header: {len(table)} tensors, more than {MAX_TENSORS}")
        header_end = PREAMBLE_SIZE + self.header_len
        infos: dict[str, TensorInfo] = {}
        required = ("name", "dtype", "shape", "offset", "nbytes", "crc32")
        for i, e in enumerate(table):
            where = f"tensor {i}"
            if not isinstance(e, dict):
                raise self._err(f"{where}: entry must be an object")
            for key in required:
                if key not in e:
                    raise self._err(f"{where}: entry lacks the key {key!r}")
            extra = sorted(set(e) - set(required) - {"scale", "scale_granularity"})
            if extra:
                raise self._err(f"{where}: unknown keys {extra}")
            name, dtype = e["name"], e["dtype"]
            try:
                _check_spec(name, dtype, e["shape"], e.get("scale"), e.get("scale_granularity"), where)
            except PackedFormatError as err:
                raise self._err(str(err)) from None
            where = f"tensor {name!r}"
            if name in infos:
                raise self._err(f"{where}: duplicate name")
            offset, nbytes, crc = e["offset"], e["nbytes"], e["crc32"]
            want = tensor_nbytes(dtype, e["shape"])
            if not _is_int(nbytes) or nbytes != want:
                raise self._err(f"{where}: nbytes {nbytes!r:.40} differs from {want} given by {dtype} {e['shape']}")
            if not _is_int(crc) or not 0 <= crc <= 0xFFFFFFFF:
                raise self._err(f"{where}: crc32 {crc!r:.40} is not a u32")
            if not _is_int(offset) or offset < 0 or offset % ALIGN:
                raise self._err(f"{where}: offset {offset!r:.40} is not a multiple of {ALIGN}")
            if offset < header_end:
                raise self._err(f"{where}: offset {offset} lies before the end of the header ({header_end})")
            if offset + nbytes > self.size:
                raise self._err(
                    f"{where}: data at offset {offset} + {nbytes} bytes runs past the end of the file "
                    f"({self.size} bytes): truncated file"
                )
            infos[name] = TensorInfo(
                name, dtype, tuple(e["shape"]), offset, nbytes, crc, e.get("scale"), e.get("scale_granularity")
            )
        try:
            _check_scales(infos, "tensor")
        except PackedFormatError as err:
            raise self._err(str(err)) from None
        ordered = sorted(infos.values(), key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            if b.offset < a.offset + a.nbytes:
                raise self._err(
                    f"tensors {a.name!r} (offset {a.offset}, {a.nbytes} bytes) and {b.name!r} "
                    f"(offset {b.offset}) overlap"
                )
        return {t.name: t for t in ordered}

    # --- views ---

    def _info(self, name: str) -> TensorInfo:
        if self._mm is None:
            raise self._err("the file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _bytes(self, info: TensorInfo) -> np.ndarray:
        # A numpy view holds a buffer export on the mmap, and torch.from_numpy holds the array: the mapping
        # cannot be unmapped under a live tensor (torch.frombuffer would not keep it alive).
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def torch(self, name: str) -> torch.Tensor:
        """Zero-copy read-only CPU view: t2 -> ``uint8 [out, ceil(in/4)]``, floats in their logical shape."""
        info = self._info(name)
        with warnings.catch_warnings():
            # The mapping is read-only and torch has no read-only tensors; callers must not write (documented).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(self._bytes(info))
        if info.dtype == "t2":
            return t.view(info.shape[0], (info.shape[1] + 3) // 4)
        return t.view(_TORCH_DTYPE[info.dtype]).view(info.shape)

    def ternary(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-copy ``(packed uint8 [out, ceil(in/4)], scale f32 [1] or [out])`` of a t2 tensor.

        The scale (a few KiB at most) is checked to be finite and > 0.
        """
        info = self._info(name)
        if info.dtype != "t2":
            raise self._err(f"tensor {name!r} is {info.dtype}, not t2")
        self._check_scale(self.tensors[info.scale])
        return self.torch(name), self.torch(info.scale)

    def _check_scale(self, info: TensorInfo) -> None:
        if not _scales_ok(self._bytes(info)):
            raise self._err(
                f"scale tensor {info.name!r} (offset {info.offset}) holds a value that is not finite and > 0"
            )

    def verify(self, progress: bool = False) -> None:
        """Checks every tensor CRC, that t2 bytes hold no code 3 and pad rows with code 1, that scales are
        finite and > 0, and that the gaps between header and tensors are zero. Raises PackedFormatError."""
        if self._mm is None:
            raise self._err("the file is closed")
        total = sum(t.nbytes for t in self.tensors.values())
        pos = _align(PREAMBLE_SIZE + self.header_len)
        self._check_zero_gap(PREAMBLE_SIZE + self.header_len, pos)
        scale_names = {t.scale for t in self.tensors.values() if t.dtype == "t2"}
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=not progress) as bar:
            for info in self.tensors.values():
                self._check_zero_gap(pos, info.offset)
                data = self._bytes(info)
                crc = 0
                for start in range(0, info.nbytes, _CHUNK):
                    chunk = data[start : start + _CHUNK]
                    crc = zlib.crc32(chunk, crc)
                    bar.update(len(chunk))
                if crc != info.crc32:
                    raise self._err(
                        f"tensor {info.name!r} (offset {info.offset}, {info.nbytes} bytes): CRC mismatch, "
                        f"header says {info.crc32:#010x}, data gives {crc:#010x}"
                    )
                if info.dtype == "t2":
                    bad = _t2_problem(data.reshape(info.shape[0], -1), info.shape[1], info.offset)
                    if bad is not None:
                        raise self._err(f"tensor {info.name!r} (offset {info.offset}): {bad}")
                if info.name in scale_names:
                    self._check_scale(info)
                pos = info.offset + info.nbytes
        logger.info("verified %s: %d tensors, %d bytes", self.path, len(self.tensors), total)

    def _check_zero_gap(self, start: int, end: int) -> None:
        gap = np.frombuffer(self._mm, dtype=np.uint8, count=end - start, offset=start)
        nz = np.flatnonzero(gap)
        if nz.size:
            raise self._err(f"non-zero padding byte at offset {start + int(nz[0])}")

    def close(self) -> None:
        """Releases the mapping (views still alive keep it mapped until they are dropped)."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # live views export the buffer; the map is released with the last of them

    def __enter__(self) -> PackedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PackedFile({self.path!r}, {len(getattr(self, 'tensors', {}))} tensors)"


# --- inspect ------------------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    """n bytes as B / KiB / MiB / GiB (2 decimals above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def tokenizer_summary(tok: dict) -> list[str]:
    """The lines ``inspect`` prints for a PACKED.md §4 tokenizer dict: model kind and size, BOS/EOS, chat template."""
    lines = []
    try:
        tj = json.loads(tok["tokenizer_json"])
        vocab = tj.get("model", {}).get("vocab", {})
        added = {a.get("id") for a in tj.get("added_tokens", []) if isinstance(a, dict)}
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        kind = tj.get("model", {}).get("type", "?")
        lines.append(f"  model: {kind}, vocab size {len(ids | added)} ({len(added)} added tokens)")
    except (ValueError, TypeError, AttributeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        lines.append(f"  tokenizer_json: unreadable ({e})")
    lines.append(
        f"  bos_token: {tok['bos_token']!r} (add_bos_token {tok['add_bos_token']}), "
        f"eos_token: {tok['eos_token']!r} (add_eos_token {tok['add_eos_token']})"
    )
    tmpl = tok["chat_template"]
    lines.append(f"  chat template: {'yes (%d chars)' % len(tmpl) if tmpl else 'none'}")
    return lines


def describe(path: str | os.PathLike, verify: bool = False) -> str:
    """Human-readable summary of a packed file (``bitnet-convert inspect``); with ``verify``, checks the data first."""
    with PackedFile(path) as pf:
        if verify:
            pf.verify()
        lines = [f"{pf.path}: bitnet158 packed file, version {pf.version}, {human_bytes(pf.size)} ({pf.size} bytes)"]
        lines.append("config:")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in pf.config.items()]
        lines.append("tokenizer:")
        lines += tokenizer_summary(pf.tokenizer)
        lines.append("provenance:")
        for k, v in pf.provenance.items():
            if k == "files" and isinstance(v, dict):
                lines.append(f"  files: {len(v)}")
                lines += [f"    {h}  {f}" for f, h in v.items()]
            else:
                lines.append(f"  {k}: {v}")
        lines.append(f"tensors: {len(pf.tensors)}")
        width = max(len(n) for n in pf.tensors) if pf.tensors else 4
        lines.append(f"  {'name':<{width}}  {'dtype':<5}  {'shape':<16}  {'offset':>12}  {'nbytes':>12}  scale")
        for t in pf.tensors.values():
            scale = f"{t.scale} ({t.scale_granularity})" if t.dtype == "t2" else ""
            shape = "x".join(map(str, t.shape))
            lines.append(f"  {t.name:<{width}}  {t.dtype:<5}  {shape:<16}  {t.offset:>12}  {t.nbytes:>12}  {scale}")
        t2 = [t for t in pf.tensors.values() if t.dtype == "t2"]
        params = sum(t.shape[0] * t.shape[1] for t in t2)
        scale_bytes = sum(pf.tensors[n].nbytes for n in {t.scale for t in t2})
        t2_bytes = sum(t.nbytes for t in t2)
        scale_names = {t.scale for t in t2}
        other = sum(math.prod(t.shape) for t in pf.tensors.values() if t.dtype != "t2" and t.name not in scale_names)
        lines.append("totals:")
        lines.append(f"  ternary params: {params:,} in {len(t2)} tensors, {human_bytes(t2_bytes)} packed")
        if params:
            lines.append(f"  bits per ternary weight (incl. scales): {8 * (t2_bytes + scale_bytes) / params:.4f}")
        lines.append(f"  other params: {other:,}")
        lines.append(f"  file size: {human_bytes(pf.size)}")
        if verify:
            lines.append("verify: OK (all CRCs match, no code 3)")
    return "\n".join(lines)
