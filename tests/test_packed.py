"""The packed format: writer/reader round trips, golden bytes, verify(), hostile files (PACKED.md §7), writer safety.

Hostile files are built by hand here (struct + json + zlib.crc32), not by PackedWriter, so that a reader test
never depends on the writer.
"""

import errno
import json
import os
import re
import struct
import sys
import tracemalloc
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bitnet158.formats import (
    PackedFile,
    PackedFormatError,
    PackedWriter,
    SourceError,
    TensorSpec,
    open_source,
)
from bitnet158.formats import packed as packed_format
from bitnet158.formats.packed import describe, model_tensors
from bitnet158.formats.ternary import pack_t2, unpack_t2

CONFIG = {
    "family": "bitnet",
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 6,
    "max_position_embeddings": 16,
    "rope_theta": 10000.0,
    "rope_style": "neox",
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "hidden_act": "relu2",
    "sub_norms": True,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": [2, 5],
}
TOKENIZER_JSON = json.dumps(
    {
        "version": "1.0",
        "added_tokens": [{"id": 5, "content": "<|eot|>", "special": True}],
        "model": {"type": "BPE", "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, "merges": []},
    }
)
TOKENIZER = {
    "tokenizer_json": TOKENIZER_JSON,
    "chat_template": "{{ messages }}",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_bos_token": True,
    "add_eos_token": False,
}
PROVENANCE = {
    "source": "/models/tiny",
    "revision": None,
    "files": {"model.safetensors": "ab" * 32},
    "converter": "bitnet158 0.1.0",
    "created": "2026-01-01T00:00:00Z",
}
GOLDEN_T = torch.tensor([[1, 0, -1, 1, 1, -1], [-1, -1, 0, 0, 1, 0]], dtype=torch.int8)
GOLDEN_T_BYTES = bytes([0x86, 0x52, 0x50, 0x56])  # hand-derived in test_ternary.test_t2_golden_bytes


def write_file(path, specs, data, **kw):
    with PackedWriter(path, config=CONFIG, tokenizer=TOKENIZER, provenance=PROVENANCE, tensors=specs, **kw) as w:
        for name, value in data.items():
            w.write(name, value)


def all_dtypes_model():
    g = torch.Generator().manual_seed(0)
    t_row = torch.randint(-1, 2, (5, 13), generator=g, dtype=torch.int8)  # in not a multiple of 4
    t_tensor = torch.randint(-1, 2, (8, 16), generator=g, dtype=torch.int8)
    specs = [
        TensorSpec("embed.weight", "bf16", (6, 8)),
        TensorSpec("layers.0.attn.q_proj.weight", "t2", (5, 13), "layers.0.attn.q_proj.weight_scale", "row"),
        TensorSpec("layers.0.attn.q_proj.weight_scale", "f32", (5,)),
        TensorSpec("layers.0.mlp.up_proj.weight", "t2", (8, 16), "layers.0.mlp.up_proj.weight_scale", "tensor"),
        TensorSpec("layers.0.mlp.up_proj.weight_scale", "f32", (1,)),
        TensorSpec("norm.weight", "f16", (8,)),
        TensorSpec("x.4d", "f32", (2, 1, 3, 2)),
    ]
    data = {
        "embed.weight": torch.randn(6, 8, generator=g).bfloat16(),
        "layers.0.attn.q_proj.weight": pack_t2(t_row),
        "layers.0.attn.q_proj.weight_scale": torch.rand(5, generator=g) + 0.1,
        "layers.0.mlp.up_proj.weight": pack_t2(t_tensor).numpy(),
        "layers.0.mlp.up_proj.weight_scale": np.array([0.25], dtype=np.float32),
        "norm.weight": np.linspace(-1, 1, 8).astype(np.float16),
        "x.4d": torch.arange(12, dtype=torch.float32).reshape(2, 1, 3, 2),
    }
    return specs, data, {"q": t_row, "up": t_tensor}


# --- round trips ---------------------------------------------------------------------------------------------


def test_round_trip_all_dtypes(tmp_path):
    path = tmp_path / "m.bnp"
    specs, data, ts = all_dtypes_model()
    # Write in an order unlike the table's: the writer seeks.
    write_file(path, specs, dict(reversed(list(data.items()))))
    assert os.listdir(tmp_path) == ["m.bnp"]
    with PackedFile(path) as f:
        assert f.config == CONFIG and f.tokenizer == TOKENIZER and f.provenance == PROVENANCE
        assert list(f.tensors) == [s.name for s in specs]  # file order = table order
        for s in specs:
            info = f.tensors[s.name]
            assert (info.dtype, info.shape, info.scale, info.scale_granularity) == (
                s.dtype,
                s.shape,
                s.scale,
                s.scale_granularity,
            )
            assert info.offset % 64 == 0
            got = f.torch(s.name)
            want = data[s.name]
            want = want if isinstance(want, torch.Tensor) else torch.from_numpy(want)
            assert got.dtype == want.dtype and torch.equal(got, want), s.name
        packed, scale = f.ternary("layers.0.attn.q_proj.weight")
        assert torch.equal(unpack_t2(packed, 13), ts["q"])
        assert scale.dtype == torch.float32 and torch.equal(scale, data["layers.0.attn.q_proj.weight_scale"])
        packed, scale = f.ternary("layers.0.mlp.up_proj.weight")
        assert torch.equal(unpack_t2(packed, 16), ts["up"]) and scale.tolist() == [0.25]
        f.verify(progress=True)


def test_views_are_zero_copy_into_the_mapping(tmp_path, recwarn):
    path = tmp_path / "m.bnp"
    specs, data, _ = all_dtypes_model()
    write_file(path, specs, data)
    f = PackedFile(path)
    base = np.frombuffer(f._mm, dtype=np.uint8).ctypes.data
    for name, info in f.tensors.items():
        t = f.torch(name)
        assert t.data_ptr() == base + info.offset, name
        assert t.data_ptr() % 64 == 0
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    # A view outlives close(): the mapping stays until the view is dropped (no dangling pointer).
    emb = f.torch("embed.weight")
    f.close()
    assert torch.equal(emb, data["embed.weight"])
    with pytest.raises(PackedFormatError, match="closed"):
        f.torch("embed.weight")


def test_golden_file_bytes(tmp_path):
    path = tmp_path / "g.bnp"
    specs = [TensorSpec("w", "t2", (2, 6), "w_scale", "tensor"), TensorSpec("w_scale", "f32", (1,))]
    write_file(path, specs, {"w": pack_t2(GOLDEN_T), "w_scale": np.array([0.5], np.float32)})
    raw = path.read_bytes()
    header_len = struct.unpack_from("<Q", raw, 16)[0]
    header = json.loads(raw[32 : 32 + header_len])
    # Preamble, byte for byte: magic, version 1, flags 0, header_len, crc32, reserved 0.
    assert raw[:16] == b"BN158PAK" + bytes([1, 0, 0, 0]) + bytes([0, 0, 0, 0])
    assert raw[24:28] == struct.pack("<I", zlib.crc32(raw[32 : 32 + header_len]))
    assert raw[28:32] == bytes(4)
    # Pinned: header_len 1235 (0x4D3) and its CRC, for this exact metadata. A change here changes the bytes
    # every writer produces; update it only together with PACKED.md or a deliberate serialization change.
    assert raw[16:28] == bytes.fromhex("d304000000000000" "ef68d00b")
    assert len(raw) == 1348 and raw[32 + header_len - 1 : 32 + header_len] in (b"}", b" ")
    data_start = (32 + header_len + 63) // 64 * 64
    assert raw[32 + header_len : data_start] == bytes(data_start - 32 - header_len)
    # Tensor table and data: the t2 bytes as hand-derived, then the f32 0.5 = 0x3F000000 little-endian.
    assert header["tensors"] == [
        {
            "name": "w",
            "dtype": "t2",
            "shape": [2, 6],
            "offset": data_start,
            "nbytes": 4,
            "crc32": zlib.crc32(GOLDEN_T_BYTES),
            "scale": "w_scale",
            "scale_granularity": "tensor",
        },
        {
            "name": "w_scale",
            "dtype": "f32",
            "shape": [1],
            "offset": data_start + 64,
            "nbytes": 4,
            "crc32": zlib.crc32(b"\x00\x00\x00\x3f"),
        },
    ]
    assert {k: header[k] for k in ("format", "version")} == {"format": "bitnet158-packed", "version": 1}
    assert raw[data_start:] == GOLDEN_T_BYTES + bytes(60) + b"\x00\x00\x00\x3f"


def test_describe(tmp_path):
    path = tmp_path / "m.bnp"
    specs, data, _ = all_dtypes_model()
    write_file(path, specs, data)
    text = describe(path, verify=True)
    assert "vocab size 6" in text  # 5 in the model vocab + 1 added token
    assert "chat template: yes" in text and "'<s>'" in text and "'</s>'" in text
    assert "layers.0.attn.q_proj.weight" in text and "5x13" in text
    ternary = 5 * 13 + 8 * 16
    assert f"ternary params: {ternary:,}" in text
    bits = 8 * (5 * 4 + 8 * 4 + 5 * 4 + 4) / ternary
    assert f"{bits:.4f}" in text
    assert f"({path.stat().st_size} bytes)" in text
    assert "verify: OK" in text


# --- verify --------------------------------------------------------------------------------------------------


def flip_byte(path, offset, value=None):
    raw = bytearray(path.read_bytes())
    raw[offset] = raw[offset] ^ 0x01 if value is None else value
    path.write_bytes(bytes(raw))


def test_verify_detects_flipped_data_byte(tmp_path):
    path = tmp_path / "m.bnp"
    specs, data, _ = all_dtypes_model()
    write_file(path, specs, data)
    with PackedFile(path) as f:
        f.verify(progress=False)
        offset = f.tensors["norm.weight"].offset + 3
    flip_byte(path, offset)
    with PackedFile(path) as f:  # open does not read the data
        with pytest.raises(PackedFormatError, match=r"'norm.weight'.*CRC mismatch"):
            f.verify()


# --- hostile files -------------------------------------------------------------------------------------------

DATA_AT = 4096  # hostile files put their data here, well past their small headers


def base_header():
    """A valid header for: w t2 [2, 6] with tensor scale w_scale f32 [1]; e bf16 [2, 2]."""
    return {
        "format": "bitnet158-packed",
        "version": 1,
        "config": json.loads(json.dumps(CONFIG)),
        "tokenizer": dict(TOKENIZER),
        "provenance": json.loads(json.dumps(PROVENANCE)),
        "tensors": [
            {
                "name": "w",
                "dtype": "t2",
                "shape": [2, 6],
                "offset": DATA_AT,
                "nbytes": 4,
                "crc32": zlib.crc32(GOLDEN_T_BYTES),
                "scale": "w_scale",
                "scale_granularity": "tensor",
            },
            {
                "name": "w_scale",
                "dtype": "f32",
                "shape": [1],
                "offset": DATA_AT + 64,
                "nbytes": 4,
                "crc32": zlib.crc32(struct.pack("<f", 0.5)),
            },
            {
                "name": "e",
                "dtype": "bf16",
                "shape": [2, 2],
                "offset": DATA_AT + 128,
                "nbytes": 8,
                "crc32": zlib.crc32(bytes(8)),
            },
        ],
    }


def build(path, header=None, *, header_bytes=None, magic=b"BN158PAK", version=1, flags=0, reserved=0,
          header_len=None, crc=None, data=None, truncate=None):
    """Writes preamble + header + data by hand. `data` maps offset -> bytes (default: the base tensors)."""
    if header_bytes is None:
        header_bytes = json.dumps(header if header is not None else base_header()).encode()
    hb = header_bytes
    pre = struct.pack(
        "<8sIIQII",
        magic,
        version,
        flags,
        len(hb) if header_len is None else header_len,
        zlib.crc32(hb) if crc is None else crc,
        reserved,
    )
    raw = bytearray(pre + hb)
    if data is None and len(raw) <= DATA_AT:  # (a header that reaches DATA_AT is rejected before any data)
        data = {DATA_AT: GOLDEN_T_BYTES, DATA_AT + 64: struct.pack("<f", 0.5), DATA_AT + 128: bytes(8)}
    for offset, chunk in (data or {}).items():
        if len(raw) < offset + len(chunk):
            raw.extend(bytes(offset + len(chunk) - len(raw)))
        raw[offset : offset + len(chunk)] = chunk
    if truncate is not None:
        raw = raw[:truncate]
    path.write_bytes(bytes(raw))
    return path


def test_hand_built_base_file_is_valid(tmp_path):
    # The hostile cases below each break one thing of this file.
    with PackedFile(build(tmp_path / "ok.bnp")) as f:
        f.verify()
        packed, scale = f.ternary("w")
        assert torch.equal(unpack_t2(packed, 6), GOLDEN_T) and scale.tolist() == [0.5]
        assert f.torch("e").dtype == torch.bfloat16


def mutate(fn):
    h = base_header()
    fn(h)
    return h


def tensor(h, name):
    return next(e for e in h["tensors"] if e["name"] == name)


HOSTILE = {
    # name: (build kwargs, regex the error must match)
    "wrong magic": (dict(magic=b"BN158PAX"), r"wrong magic .* offset 0"),
    "gguf magic": (dict(magic=b"GGUF\x03\x00\x00\x00"), r"wrong magic .*; it is a GGUF file: bitnet-run reads it"),
    "bad version": (dict(version=2), r"version 2 at offset 8.*reads version 1"),
    "flags": (dict(flags=1), r"flags 0x1 at offset 12"),
    "reserved": (dict(reserved=7), r"reserved .* offset 28"),
    "header_len huge": (dict(header_len=2**60), r"header_len \d+ at offset 16 is larger than"),
    "header_len just over 64 MiB": (dict(header_len=64 * 2**20 + 1), r"header_len .* larger than"),
    "header past EOF": (dict(header_len=5000), r"header_len 5000 at offset 16 runs past the end"),
    "bad header crc": (dict(crc=123), r"header CRC mismatch"),
    "invalid utf-8": (dict(header_bytes=b'{"format": "\xff"}'), r"not UTF-8 at offset 44"),
    "bad json": (dict(header_bytes=b'{"format": '), r"not valid JSON at offset"),
    "json NaN": (dict(header_bytes=b'{"x": NaN}'), r"not valid JSON"),
    "duplicate json key": (
        dict(header_bytes=b'{"format": 1, "format": 2}'),
        r"duplicate key 'format'",
    ),
    "deep json": (dict(header_bytes=b"[" * 100000 + b"]" * 100000), r"nests too deeply|not valid JSON"),
    "header not object": (dict(header_bytes=b"[1, 2]"), r"must be a JSON object"),
    "missing key": (dict(header=mutate(lambda h: h.pop("provenance"))), r"lacks the key 'provenance'"),
    "unknown top key": (dict(header=mutate(lambda h: h.update(extra=1))), r"unknown top-level keys \['extra'\]"),
    "wrong format": (dict(header=mutate(lambda h: h.update(format="safetensors"))), r"format is 'safetensors'"),
    "header version differs": (dict(header=mutate(lambda h: h.update(version=2))), r"differs from the preamble"),
    "config wrong type": (
        dict(header=mutate(lambda h: h["config"].update(hidden_size="8"))),
        r"config.hidden_size must be a positive int",
    ),
    "config missing key": (dict(header=mutate(lambda h: h["config"].pop("rope_theta"))), r"config lacks .*rope_theta"),
    "tokenizer wrong type": (
        dict(header=mutate(lambda h: h["tokenizer"].update(add_bos_token="yes"))),
        r"tokenizer.add_bos_token must be a bool",
    ),
    "provenance bad hash": (
        dict(header=mutate(lambda h: h["provenance"]["files"].update(x="XYZ"))),
        r"provenance.files must be",
    ),
    "tensors not array": (dict(header=mutate(lambda h: h.update(tensors={}))), r"'tensors' must be an array"),
    "too many tensors": (
        dict(header=mutate(lambda h: h.update(tensors=[{}] * 100_001))),
        r"100001 tensors, more than 100000",
    ),
    "entry lacks key": (
        dict(header=mutate(lambda h: tensor(h, "e").pop("crc32"))),
        r"tensor 2: entry lacks the key 'crc32'",
    ),
    "entry unknown key": (dict(header=mutate(lambda h: tensor(h, "e").update(z=1))), r"unknown keys \['z'\]"),
    "dup name": (dict(header=mutate(lambda h: tensor(h, "e").update(name="w_scale"))), r"'w_scale': duplicate name"),
    "bad name": (dict(header=mutate(lambda h: tensor(h, "e").update(name="e/../x"))), r"malformed tensor name"),
    "empty name": (dict(header=mutate(lambda h: tensor(h, "e").update(name=""))), r"malformed tensor name"),
    "long name": (dict(header=mutate(lambda h: tensor(h, "e").update(name="a" * 257))), r"malformed tensor name"),
    "non-ascii name": (dict(header=mutate(lambda h: tensor(h, "e").update(name="é"))), r"malformed tensor name"),
    "unknown dtype": (dict(header=mutate(lambda h: tensor(h, "e").update(dtype="i8"))), r"unknown dtype 'i8'"),
    "0 dims": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[]))), r"bad shape"),
    "5 dims": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[1, 1, 1, 1, 4]))), r"bad shape"),
    "dim 0": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[0, 4]))), r"bad shape"),
    "dim negative": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[-2, -2]))), r"bad shape"),
    "dim 2^31": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[2**31, 1]))), r"bad shape"),
    "dim float": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[2.0, 2]))), r"bad shape"),
    "dim bool": (dict(header=mutate(lambda h: tensor(h, "e").update(shape=[True, 4]))), r"bad shape"),
    "nbytes mismatch": (dict(header=mutate(lambda h: tensor(h, "e").update(nbytes=16))), r"nbytes 16 differs from 8"),
    "crc not u32": (dict(header=mutate(lambda h: tensor(h, "e").update(crc32=-1))), r"crc32 -1 is not a u32"),
    "misaligned offset": (
        dict(header=mutate(lambda h: tensor(h, "e").update(offset=DATA_AT + 130))),
        r"'e': offset 4226 is not a multiple of 64",
    ),
    "offset inside header": (
        dict(header=mutate(lambda h: tensor(h, "w").update(offset=64))),
        r"'w': offset 64 lies before the end of the header",
    ),
    "truncated data": (
        dict(truncate=DATA_AT + 130),
        r"'e': data at offset 4224 \+ 8 bytes runs past the end .*truncated",
    ),
    "overlapping tensors": (
        dict(header=mutate(lambda h: tensor(h, "e").update(offset=DATA_AT + 64, shape=[2, 1], nbytes=4))),
        r"'w_scale' .* and 'e' .* overlap|'e' .* and 'w_scale' .* overlap",
    ),
    "t2 not 2-D": (
        dict(header=mutate(lambda h: tensor(h, "w").update(shape=[2, 1, 6], nbytes=4))),
        r"'w': a t2 tensor must be 2-D",
    ),
    "t2 without scale": (
        dict(header=mutate(lambda h: tensor(h, "w").pop("scale"))),
        r"'w': a t2 tensor needs a 'scale'",
    ),
    "scale names nothing": (
        dict(header=mutate(lambda h: tensor(h, "w").update(scale="nope"))),
        r"'w': its scale 'nope' names no f32 tensor",
    ),
    "scale not f32": (
        dict(header=mutate(lambda h: tensor(h, "w").update(scale="e"))),
        r"'w': its scale 'e' names no f32 tensor",
    ),
    "scale shape vs granularity": (
        dict(header=mutate(lambda h: tensor(h, "w").update(scale_granularity="row"))),
        r"scale 'w_scale' has shape \[1\], scale_granularity 'row' needs \[2\]",
    ),
    "bad granularity": (
        dict(header=mutate(lambda h: tensor(h, "w").update(scale_granularity="column"))),
        r"unknown scale_granularity 'column'",
    ),
    "scale on a float tensor": (
        dict(header=mutate(lambda h: tensor(h, "e").update(scale="w_scale", scale_granularity="tensor"))),
        r"only t2 tensors take 'scale'",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_file_rejected_on_open(tmp_path, case):
    kwargs, pattern = HOSTILE[case]
    path = build(tmp_path / "bad.bnp", **kwargs)
    tracemalloc.start()
    try:
        with pytest.raises(PackedFormatError, match=pattern) as info:
            PackedFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(info.value)
    # No allocation sized by a lying header field (the 100001-entry table is itself ~1 MB of JSON).
    assert peak < 64 * 2**20 if case in ("deep json", "too many tensors") else peak < 2**20, peak


@pytest.mark.parametrize("size", [0, 7, 31])
def test_short_file_rejected(tmp_path, size):
    path = tmp_path / "short.bnp"
    path.write_bytes(b"BN158PAK\x01\x00\x00\x00" * 3)
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(PackedFormatError, match=rf"file is {size} bytes, shorter than the 32-byte preamble"):
        PackedFile(path)


def test_verify_rejects_crc_mismatch(tmp_path):
    h = mutate(lambda h: tensor(h, "w_scale").update(crc32=tensor(h, "w_scale")["crc32"] ^ 1))
    with PackedFile(build(tmp_path / "bad.bnp", h)) as f:
        with pytest.raises(PackedFormatError, match=r"'w_scale' \(offset 4160, 4 bytes\): CRC mismatch"):
            f.verify()


def test_verify_rejects_code_3(tmp_path):
    bad = bytes([0x86, 0x53, 0x50, 0x56])  # byte 1 now has code 3 in its low field; CRC made to match
    h = mutate(lambda h: tensor(h, "w").update(crc32=zlib.crc32(bad)))
    data = {DATA_AT: bad, DATA_AT + 64: struct.pack("<f", 0.5), DATA_AT + 128: bytes(8)}
    with PackedFile(build(tmp_path / "bad.bnp", h, data=data)) as f:
        with pytest.raises(PackedFormatError, match=r"'w' \(offset 4096\): code 3 in byte at offset 4097 \(row 0\)"):
            f.verify()


def test_verify_rejects_bad_padding_codes(tmp_path):
    bad = bytes([0x86, 0x12, 0x50, 0x56])  # row 0 pads with code 0 (-1) instead of 1
    h = mutate(lambda h: tensor(h, "w").update(crc32=zlib.crc32(bad)))
    data = {DATA_AT: bad, DATA_AT + 64: struct.pack("<f", 0.5), DATA_AT + 128: bytes(8)}
    with PackedFile(build(tmp_path / "bad.bnp", h, data=data)) as f:
        with pytest.raises(PackedFormatError, match=r"row 0 pads past in=6 with codes other than 1"):
            f.verify()


def test_verify_rejects_non_zero_gap(tmp_path):
    data = {DATA_AT: GOLDEN_T_BYTES + b"\x01", DATA_AT + 64: struct.pack("<f", 0.5), DATA_AT + 128: bytes(8)}
    with PackedFile(build(tmp_path / "bad.bnp", data=data)) as f:
        with pytest.raises(PackedFormatError, match=r"non-zero padding byte at offset 4100"):
            f.verify()


@pytest.mark.parametrize("value", [0.0, -0.5, float("inf"), float("nan")])
def test_bad_scale_rejected_by_ternary_and_verify(tmp_path, value):
    raw = struct.pack("<f", value)
    h = mutate(lambda h: tensor(h, "w_scale").update(crc32=zlib.crc32(raw)))
    data = {DATA_AT: GOLDEN_T_BYTES, DATA_AT + 64: raw, DATA_AT + 128: bytes(8)}
    with PackedFile(build(tmp_path / "bad.bnp", h, data=data)) as f:
        with pytest.raises(PackedFormatError, match=r"scale tensor 'w_scale' \(offset 4160\) .* not finite and > 0"):
            f.ternary("w")
        with pytest.raises(PackedFormatError, match=r"not finite and > 0"):
            f.verify()


def test_reader_errors_for_misuse(tmp_path):
    with PackedFile(build(tmp_path / "ok.bnp")) as f:
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            f.torch("nope")
        with pytest.raises(PackedFormatError, match="'e' is bf16, not t2"):
            f.ternary("e")


# --- writer --------------------------------------------------------------------------------------------------

SMALL_SPECS = [TensorSpec("w", "t2", (2, 6), "w_scale", "tensor"), TensorSpec("w_scale", "f32", (1,))]
SMALL_DATA = {"w": pack_t2(GOLDEN_T), "w_scale": np.array([0.5], np.float32)}


def writer(path, specs=SMALL_SPECS, **kw):
    return PackedWriter(path, config=CONFIG, tokenizer=TOKENIZER, provenance=PROVENANCE, tensors=specs, **kw)


def test_writer_refuses_overwrite(tmp_path):
    path = tmp_path / "m.bnp"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        writer(path)
    assert path.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["m.bnp"]
    write_file(path, SMALL_SPECS, SMALL_DATA, overwrite=True)
    with PackedFile(path) as f:
        assert torch.equal(unpack_t2(f.torch("w"), 6), GOLDEN_T)


def test_writer_names_a_missing_output_folder(tmp_path):
    # not the temp file it could not create beside the output
    with pytest.raises(FileNotFoundError, match=f"the folder {tmp_path / 'no'} does not exist: '.*m.bnp'"):
        writer(tmp_path / "no" / "m.bnp")
    (tmp_path / "file").write_bytes(b"")  # a file where the folder should be
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is not a folder: '.*m.bnp'"):
        writer(tmp_path / "file" / "m.bnp")


def test_writer_leaves_nothing_on_exception(tmp_path):
    path = tmp_path / "m.bnp"
    with pytest.raises(RuntimeError, match="boom"):
        with writer(path) as w:
            w.write("w", SMALL_DATA["w"])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_refuses_missing_tensor(tmp_path):
    path = tmp_path / "m.bnp"
    with pytest.raises(PackedFormatError, match="tensors never written: w_scale"):
        with writer(path) as w:
            w.write("w", SMALL_DATA["w"])
    assert os.listdir(tmp_path) == []


def test_writer_dropped_without_close_removes_temp(tmp_path):
    w = writer(tmp_path / "m.bnp")
    assert len(os.listdir(tmp_path)) == 1  # the temp file
    del w
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["write", "reserve", "fsync"])
def test_writer_disk_full_leaves_nothing(tmp_path, monkeypatch, where):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = tmp_path / "m.bnp"
    if where == "reserve":
        monkeypatch.setattr(os, "posix_fallocate", full)
    elif where == "write":
        monkeypatch.setattr(os, "pwrite", full)
    else:
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"no space left on the device while writing .*m\.bnp") as info:
        write_file(path, SMALL_SPECS, SMALL_DATA)
    assert info.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


def test_writer_other_preallocation_errors_propagate(tmp_path, monkeypatch):
    # only "cannot preallocate here" falls back to sizing the file; an I/O error is the user's to see
    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "posix_fallocate", broken)
    with pytest.raises(OSError, match="Input/output error") as info:
        writer(tmp_path / "m.bnp")
    assert info.value.errno == errno.EIO and os.listdir(tmp_path) == []


def test_writer_misuse_and_races_lose_nothing(tmp_path):
    # a directory as the output: refused before anything is written, the directory untouched
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_bytes(b"keep")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        writer(tmp_path / "out", overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out" / "x").read_bytes() == b"keep"
    # the output appears while the file is being written: kept, and the temp file goes
    path = tmp_path / "m.bnp"
    w = writer(path)
    for name, value in SMALL_DATA.items():
        w.write(name, value)
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        w.close()
    assert path.read_bytes() == b"someone else's" and sorted(os.listdir(tmp_path)) == ["m.bnp", "out"]
    # a closed writer refuses writes; a closed reader refuses verify()
    with pytest.raises(PackedFormatError, match="the writer is closed"):
        w.write("w", SMALL_DATA["w"])
    write_file(tmp_path / "ok.bnp", SMALL_SPECS, SMALL_DATA)
    f = PackedFile(tmp_path / "ok.bnp")
    f.close()
    with pytest.raises(PackedFormatError, match="the file is closed"):
        f.verify()


def test_writer_limits_match_the_readers(tmp_path, monkeypatch):
    # the writer refuses what a reader would refuse to open (checked with the limits made small)
    monkeypatch.setattr(packed_format, "MAX_TENSORS", 2)
    with pytest.raises(PackedFormatError, match="3 tensors, more than 2"):
        writer(tmp_path / "m.bnp", [*SMALL_SPECS, TensorSpec("e", "f32", (1,))])
    monkeypatch.setattr(packed_format, "MAX_HEADER_LEN", 1000)
    with pytest.raises(PackedFormatError, match=r"the header is \d+ bytes, more than 1000"):
        writer(tmp_path / "m.bnp")
    assert os.listdir(tmp_path) == []


def test_writer_falls_back_when_preallocation_unsupported(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    path = tmp_path / "m.bnp"
    write_file(path, SMALL_SPECS, SMALL_DATA)
    with PackedFile(path) as f:
        f.verify()


def test_tensor_spec_accepts_torch_and_numpy_shapes(tmp_path):
    specs = [
        TensorSpec("w", "t2", torch.Size([2, 6]), "w_scale", "tensor"),
        TensorSpec("w_scale", "f32", np.zeros(1).shape),
        TensorSpec("e", "f32", [np.int64(2), 3]),
    ]
    assert specs[0].shape == (2, 6) and type(specs[2].shape[0]) is int
    write_file(tmp_path / "m.bnp", specs, {**SMALL_DATA, "e": np.zeros((2, 3), np.float32)})
    with PackedFile(tmp_path / "m.bnp") as f:
        assert f.tensors["e"].shape == (2, 3)


def test_writer_big_endian_numpy_input(tmp_path):
    path = tmp_path / "m.bnp"
    write_file(path, SMALL_SPECS, {"w": SMALL_DATA["w"], "w_scale": np.array([0.5], dtype=">f4")})
    with PackedFile(path) as f:
        assert f.torch("w_scale").tolist() == [0.5]


BAD_WRITES = {
    "unknown name": ("x", np.zeros(1, np.float32), r"'x' is not in the tensor table"),
    "t2 wrong dtype": ("w", torch.zeros(2, 2, dtype=torch.int8), r"'w' \(t2\): got torch dtype torch.int8"),
    "t2 wrong shape": ("w", torch.ones(2, 3, dtype=torch.uint8), r"'w': got shape \[2, 3\], expected \[2, 2\]"),
    "t2 code 3": ("w", torch.tensor([[0x86, 0x52], [0x53, 0x56]], dtype=torch.uint8), r"code 3 in byte 2 \(row 1\)"),
    "t2 bad padding": ("w", torch.tensor([[0x86, 0x52], [0x50, 0x06]], dtype=torch.uint8), r"row 1 pads past in=6"),
    "scale wrong dtype": ("w_scale", np.array([0.5], np.float64), r"got numpy dtype float64"),
    "scale zero": ("w_scale", np.array([0.0], np.float32), r"finite and > 0"),
    "scale nan": ("w_scale", torch.tensor([float("nan")]), r"finite and > 0"),
    "not an array": ("w_scale", [0.5], r"expected a numpy array or torch tensor"),
    "numpy wrong shape": ("w_scale", np.array([[0.5]], np.float32), r"'w_scale': got shape \[1, 1\], expected \[1\]"),
}


@pytest.mark.parametrize("case", list(BAD_WRITES), ids=list(BAD_WRITES))
def test_writer_rejects_bad_data(tmp_path, case):
    name, value, pattern = BAD_WRITES[case]
    with pytest.raises(PackedFormatError, match=pattern):
        with writer(tmp_path / "m.bnp") as w:
            w.write(name, value)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_double_write_and_bf16_numpy(tmp_path):
    with pytest.raises(PackedFormatError, match="'w' was already written"):
        with writer(tmp_path / "m.bnp") as w:
            w.write("w", SMALL_DATA["w"])
            w.write("w", SMALL_DATA["w"])
    specs = [TensorSpec("e", "bf16", (2,))]
    with pytest.raises(PackedFormatError, match="pass bf16 as a torch.bfloat16 tensor"):
        with writer(tmp_path / "m.bnp", specs) as w:
            w.write("e", np.zeros(2, np.float16))
    assert os.listdir(tmp_path) == []


BAD_SPECS = {
    "t2 without scale": ([TensorSpec("w", "t2", (2, 6))], r"needs a 'scale'"),
    "scale missing": ([TensorSpec("w", "t2", (2, 6), "s", "row")], r"its scale 's' names no f32 tensor"),
    "scale wrong shape": (
        [TensorSpec("w", "t2", (2, 6), "s", "row"), TensorSpec("s", "f32", (1,))],
        r"scale_granularity 'row' needs \[2\]",
    ),
    "dup name": ([TensorSpec("a", "f32", (1,)), TensorSpec("a", "f32", (1,))], r"duplicate name 'a'"),
    "bad name": ([TensorSpec("a b", "f32", (1,))], r"malformed tensor name"),
    "bad dtype": ([TensorSpec("a", "f64", (1,))], r"unknown dtype"),
    "empty": ([], r"tensor table is empty"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_writer_rejects_bad_table(tmp_path, case):
    specs, pattern = BAD_SPECS[case]
    with pytest.raises(PackedFormatError, match=pattern):
        writer(tmp_path / "m.bnp", specs)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_metadata(tmp_path):
    def attempt(**kw):
        args = dict(config=CONFIG, tokenizer=TOKENIZER, provenance=PROVENANCE, tensors=SMALL_SPECS)
        args.update(kw)
        return PackedWriter(tmp_path / "m.bnp", **args)

    with pytest.raises(PackedFormatError, match="config lacks the key 'head_dim'"):
        attempt(config={k: v for k, v in CONFIG.items() if k != "head_dim"})
    with pytest.raises(PackedFormatError, match="not JSON-serializable"):
        attempt(config={**CONFIG, "rope_theta": float("nan")})
    with pytest.raises(PackedFormatError, match="not JSON-serializable"):
        attempt(provenance={**PROVENANCE, "created": object()})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("change,message", [
    ({"num_hidden_layers": 2000}, r"num_hidden_layers=2000 is outside \[1, 1024\]"),
    ({"max_position_embeddings": (1 << 22) + 1}, r"max_position_embeddings=4194305 is outside"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope_scaling type 'yarn'"),
    ({"eos_token_id": [6]}, r"eos_token_id 6 is not a token id below vocab_size=6"),
    ({"rope_theta": 10**400}, "rope_theta"),  # past the float range: once an OverflowError
])
def test_writer_refuses_a_config_the_runtime_refuses(tmp_path, change, message):
    # every writer (hf-to-packed, gguf-to-packed, random models) goes through PackedWriter: it checks the config as
    # the runtime loads it (formats/config.py), so no writer leaves a file that the runtime then refuses
    with pytest.raises(PackedFormatError, match=message):
        PackedWriter(tmp_path / "m.bnp", config={**CONFIG, **change}, tokenizer=TOKENIZER, provenance=PROVENANCE,
                     tensors=SMALL_SPECS)
    assert os.listdir(tmp_path) == []


def test_writer_large_header_offsets_settle(tmp_path):
    # A long tokenizer and many tensors: the offsets' digits grow the header; the reserved length must hold.
    specs = [TensorSpec(f"t{i}", "f32", (3,)) for i in range(300)]
    tok = {**TOKENIZER, "tokenizer_json": "x" * 100_000, "chat_template": "é" * 1000}
    path = tmp_path / "m.bnp"
    with PackedWriter(path, config=CONFIG, tokenizer=tok, provenance=PROVENANCE, tensors=specs) as w:
        for i in range(300):
            w.write(f"t{i}", np.full(3, i, np.float32))
    with PackedFile(path) as f:
        f.verify()
        assert f.tokenizer["chat_template"] == "é" * 1000
        assert f.torch("t299").tolist() == [299.0] * 3


# --- open_source ---------------------------------------------------------------------------------------------


def test_open_source_without_the_gguf_reader(tmp_path, monkeypatch):
    # a build without formats/gguf.py says so; a GGUF reader that is there but lacks a dependency says which
    import importlib

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(60))
    for missing, error, match in (("bitnet158.formats.gguf", SourceError, "is a GGUF file, but this build has no GGUF"),
                                  ("gguf", ModuleNotFoundError, "No module named 'gguf'")):
        def import_module(name, missing=missing):
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

        with monkeypatch.context() as m:
            m.setattr(importlib, "import_module", import_module)
            with pytest.raises(error, match=match):
                open_source(path)


def test_open_source_dispatches_on_magic(tmp_path, monkeypatch):
    packed = build(tmp_path / "ok.bnp")
    src = open_source(packed)
    assert isinstance(src, PackedFile)
    src.close()
    # an activation override on a packed file changes what its config says, and nothing else
    src = open_source(packed, activation="silu")
    assert src.config["hidden_act"] == "silu" and src.tensors == PackedFile(packed).tensors
    src.close()
    with pytest.raises(SourceError, match="activation must be one of"):
        open_source(packed, activation="gelu")

    gguf_path = tmp_path / "m.gguf"
    gguf_path.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(24))
    fake = types.ModuleType("bitnet158.formats.gguf")
    fake.GGUFSource = lambda p, activation=None: ("gguf", p, activation)
    monkeypatch.setitem(sys.modules, "bitnet158.formats.gguf", fake)
    assert open_source(gguf_path) == ("gguf", str(gguf_path), None)
    assert open_source(gguf_path, activation="silu") == ("gguf", str(gguf_path), "silu")  # the override reaches it

    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(SourceError, match=r"not a bitnet158 packed file or a GGUF file \(magic b'\\x10"):
        open_source(other)
    with pytest.raises(SourceError, match=r"cannot read .*missing\.bnp"):
        open_source(tmp_path / "missing.bnp")
    with pytest.raises(SourceError, match="is a directory"):
        open_source(tmp_path)
    assert issubclass(SourceError, ValueError)


def test_model_tensors_follow_the_spec_table():
    # formats.packed.model_tensors (what the loader, the GGUF reader and the random-model writer use) names the
    # tensors of PACKED.md §2.2's table, in its order, with its shapes; the optional rows only when they apply
    spec = (Path(__file__).resolve().parents[1] / "formats" / "PACKED.md").read_text(encoding="utf-8")
    table = spec.split("### 2.2 Tensor names")[1].split("The scale of")[0]
    rows = re.findall(r"^\| `([^`]+)` \| `\[([^\]]+)\]` \|", table, flags=re.M)
    dims = {"vocab": 50, "hidden": 8, "intermediate": 12, "heads × head_dim": 3 * 4, "kv_heads × head_dim": 1 * 4}
    cfg = dict(CONFIG, vocab_size=50, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1, head_dim=4,
               sub_norms=True, tie_word_embeddings=False)  # fmt: skip
    layer = [r for r in rows if "{i}" in r[0]]
    first = rows.index(layer[0])
    order = rows[:first] + [(n.replace("{i}", str(i)), sh) for i in range(2) for n, sh in layer] + rows[first + len(layer) :]
    want = {name: tuple(dims[d.strip()] for d in shape.split(",")) for name, shape in order}
    got = model_tensors(cfg)
    assert {n: s for n, (s, _) in got.items()} == want and list(got) == list(want)
    assert [n for n, (_, t) in got.items() if t] == [n for n in want if n.endswith("_proj.weight")]
    lean = model_tensors(dict(cfg, sub_norms=False, tie_word_embeddings=True))
    assert list(lean) == [n for n in want if "sub_norm" not in n and n != "lm_head.weight"]
