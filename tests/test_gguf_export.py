"""packed -> GGUF export and GGUF -> packed import (converter/gguf_convert.py).

Oracles that do not share code with the exporter: a numpy I2_S decoder written here from the layout in
REFERENCE.md §6, a minimal GGUF container parser written here, golden bytes of one I2_S tensor, and the gguf
package's own GGUFReader and TQ1_0/TQ2_0 quantizers.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from gguf import quants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bitnet158.converter import gguf_convert as gc
from bitnet158.formats import gguf as gguf_fmt
from bitnet158.formats.config import ModelConfig
from bitnet158.formats.packed import PackedFile, PackedWriter, TensorSpec
from bitnet158.formats.ternary import pack_t2

LINEARS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello bitnet", "ternary weights are small"] * 20


def _tokenizer() -> dict:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return {
        "tokenizer_json": tok.to_str(),
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "add_eos_token": False,
    }


def _config(act: str = "silu", hidden: int = 256, inter: int = 512, layers: int = 2, tie: bool = True) -> dict:
    return {
        "family": "1bitllm" if act == "silu" else "bitnet",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": hidden // 4,
        "vocab_size": 320, "max_position_embeddings": 128, "rope_theta": 10000.0, "rope_style": "neox",
        "rope_scaling": None, "rms_norm_eps": 1e-5, "hidden_act": act, "sub_norms": True,
        "tie_word_embeddings": tie, "bos_token_id": 0, "eos_token_id": [1],
    }


def _shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"attn.q_proj": (q, h), "attn.k_proj": (kv, h), "attn.v_proj": (kv, h), "attn.o_proj": (h, q),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}


def make_packed(path: Path, *, act: str = "silu", seed: int = 0, scales: str = "f16", tie: bool = True,
                hidden: int = 256, inter: int = 512, row_scales: bool = False,
                tokenizer: tuple[dict, dict] | None = None) -> dict[str, np.ndarray]:
    """Write a tiny random packed model; return its ternary values {name: int8 [out, in]}.

    scales: "f16" -> f16-exact scales (k/64), "f32" -> scales that f16 cannot hold (per tensor or per row).
    tokenizer: (tokenizer dict, {"bos_token_id", "eos_token_id", "vocab_size"}) from the converter; default: ours.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = _config(act, hidden, inter, tie=tie)
    tok = _tokenizer()
    if tokenizer is not None:
        tok, facts = tokenizer
        cfg["vocab_size"] = max(cfg["vocab_size"], facts["vocab_size"])
        cfg["bos_token_id"] = facts["bos_token_id"]
        eos = facts["eos_token_id"]
        cfg["eos_token_id"] = eos if isinstance(eos, list) else [eos]
    specs, data, ternary = [], {}, {}
    embed = (torch.randn(cfg["vocab_size"], hidden, generator=g) * 0.5).to(torch.bfloat16)
    specs.append(TensorSpec("embed.weight", "bf16", tuple(embed.shape)))
    data["embed.weight"] = embed
    shapes = _shapes(cfg)
    for li in range(cfg["num_hidden_layers"]):
        for norm, n in (("attn_norm", hidden), ("attn.sub_norm", cfg["num_attention_heads"] * cfg["head_dim"]),
                        ("mlp_norm", hidden), ("mlp.sub_norm", inter)):
            w = (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)
            specs.append(TensorSpec(f"layers.{li}.{norm}.weight", "bf16", (n,)))
            data[f"layers.{li}.{norm}.weight"] = w
        for lin in LINEARS:
            out_f, in_f = shapes[lin]
            t = torch.randint(-1, 2, (out_f, in_f), generator=g, dtype=torch.int8)
            t[:, ::256] = 1  # every 256-block has a nonzero, so gguf's TQ quantizers pick d = scale
            name = f"layers.{li}.{lin}.weight"
            if row_scales:  # f16-exact, or (scales="f32") not
                s = (torch.randint(16, 64, (out_f,), generator=g).float() / 64) + (1e-4 if scales == "f32" else 0)
            elif scales == "f16":
                s = torch.tensor([float(torch.randint(16, 64, (1,), generator=g)) / 64])
            else:
                s = torch.tensor([0.1 + 0.01 * li], dtype=torch.float32)  # 0.1 is not exact in f16
            gran = "row" if row_scales else "tensor"
            specs.append(TensorSpec(name, "t2", (out_f, in_f), scale=name + "_scale", scale_granularity=gran))
            specs.append(TensorSpec(name + "_scale", "f32", tuple(s.shape)))
            data[name] = pack_t2(t)
            data[name + "_scale"] = s.to(torch.float32)
            ternary[name] = t.numpy()
    norm = (1 + 0.1 * torch.randn(hidden, generator=g)).to(torch.bfloat16)
    specs.append(TensorSpec("norm.weight", "bf16", (hidden,)))
    data["norm.weight"] = norm
    if not tie:
        head = (torch.randn(cfg["vocab_size"], hidden, generator=g) * 0.1).to(torch.bfloat16)
        specs.append(TensorSpec("lm_head.weight", "bf16", tuple(head.shape)))
        data["lm_head.weight"] = head
    prov = {"source": str(path), "revision": None, "files": {}, "converter": "test", "created": "2026-01-01T00:00:00Z"}
    with PackedWriter(path, config=cfg, tokenizer=tok, provenance=prov, tensors=specs) as w:
        for s in specs:
            w.write(s.name, data[s.name])
    return ternary


# ---------------------------------------------------------------------------------------------------------------
# independent oracles


def parse_gguf(path: Path) -> tuple[dict, dict]:
    """Minimal GGUF v3 parser for the tests: (kv {key: value}, tensors {name: (ggml shape, type, abs offset)})."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        s = buf[pos:pos + n].decode()
        pos += n
        return s

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(scalar[t])

    assert buf[:4] == b"GGUF" and take("I") == 0x46554747 and take("I") == 3
    n_t, n_kv = take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        k = string()
        kv[k] = value(take("I"))
    infos = {}
    for _ in range(n_t):
        name = string()
        nd = take("I")
        dims = [take("Q") for _ in range(nd)]
        infos[name] = (dims, take("I"), take("Q"))
    align = kv.get("general.alignment", 32)
    data_start = (pos + align - 1) // align * align
    return kv, {n: (d, t, data_start + o) for n, (d, t, o) in infos.items()}


def decode_i2s(raw: bytes, out_f: int, in_f: int) -> tuple[np.ndarray, float]:
    """I2_S per REFERENCE §6: 32-byte blocks of 128 weights; byte b holds b, 32+b, 64+b, 96+b in bits 7-6..1-0."""
    n = out_f * in_f
    packed = np.frombuffer(raw[: n // 4], dtype=np.uint8).reshape(-1, 32)
    vals = np.empty((packed.shape[0], 128), dtype=np.int8)
    for k, shift in enumerate((6, 4, 2, 0)):
        vals[:, 32 * k:32 * k + 32] = ((packed >> shift) & 3).astype(np.int8) - 1
    scale = struct.unpack_from("<f", raw, n // 4)[0]
    return vals.reshape(out_f, in_f), scale


# ---------------------------------------------------------------------------------------------------------------
# I2_S


def test_i2s_export_layout_metadata_and_independent_decode(tmp_path):
    src = tmp_path / "m.bin"
    tern = make_packed(src, act="relu2")
    out = tmp_path / "m.gguf"
    gc.packed_to_gguf(src, out, qtype="i2_s")
    kv, tensors = parse_gguf(out)
    arch = "bitnet-b1.58"
    assert kv["general.architecture"] == arch
    assert list(kv)[0] == "general.architecture"
    assert kv[f"{arch}.block_count"] == 2 and kv[f"{arch}.embedding_length"] == 256
    assert kv[f"{arch}.feed_forward_length"] == 512 and kv[f"{arch}.vocab_size"] == 320
    assert kv[f"{arch}.attention.head_count"] == 4 and kv[f"{arch}.attention.head_count_kv"] == 2
    assert kv[f"{arch}.rope.dimension_count"] == 64 and kv[f"{arch}.context_length"] == 128
    assert kv["general.file_type"] == 40 and kv["general.quantization_version"] == 2
    assert "general.alignment" not in kv  # Microsoft's file has none: default 32
    assert kv["tokenizer.ggml.model"] == "gpt2" and len(kv["tokenizer.ggml.tokens"]) == 320
    assert kv["tokenizer.ggml.bos_token_id"] == 0 and kv["tokenizer.ggml.eos_token_id"] == 1
    tj = json.loads(_tokenizer()["tokenizer_json"])
    assert kv["tokenizer.ggml.tokens"][5] == {v: k for k, v in tj["model"]["vocab"].items()}[5]
    assert kv["tokenizer.ggml.token_type"][0] == 3 and kv["tokenizer.ggml.token_type"][5] == 1  # <s> CONTROL
    assert kv["tokenizer.ggml.tokens"][319] == "[PAD319]" and kv["tokenizer.ggml.token_type"][319] == 5  # UNUSED
    merge = tj["model"]["merges"][0]  # a pair (tokenizers ≥ 0.20) or "a b"
    assert kv["tokenizer.ggml.merges"][0] == (" ".join(merge) if isinstance(merge, list) else merge)
    assert "tokenizer.chat_template" in kv

    # 1 + 2 × 11 + 1 tensors, Microsoft's names and dtypes; no output.weight for a tied head
    assert len(tensors) == 24 and "output.weight" not in tensors
    assert tensors["token_embd.weight"][:2] == ([256, 320], 1)  # F16, ggml dims reversed
    assert tensors["blk.0.attn_sub_norm.weight"][1] == 0 and tensors["output_norm.weight"][1] == 0  # F32
    raw = out.read_bytes()
    with PackedFile(src) as pf:
        for name, gname in (("layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                            ("layers.0.attn.k_proj.weight", "blk.0.attn_k.weight")):
            dims, typ, off = tensors[gname]
            assert typ == 36 and off % 32 == 0
            out_f, in_f = dims[1], dims[0]
            vals, scale = decode_i2s(raw[off: off + out_f * in_f // 4 + 32], out_f, in_f)
            np.testing.assert_array_equal(vals, tern[name])
            assert np.float32(scale) == pf.ternary(name)[1].numpy()[0]
        # bf16 norms -> f32 exactly; bf16 embedding -> f16 exactly (values are small)
        _, _, off = tensors["blk.1.ffn_sub_norm.weight"]
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32, 512, off),
                                      pf.torch("layers.1.mlp.sub_norm.weight").float().numpy())


def test_i2s_golden_bytes():
    """One I2_S tensor (2 × 128, pattern t = (i mod 3) − 1, scale 0.5) as the exporter's codec writes it."""
    from bitnet158.formats import gguf as gf

    t = torch.tensor([(i % 3) - 1 for i in range(256)], dtype=torch.int8).reshape(2, 128)
    raw = gf.t2_to_i2s(pack_t2(t), (2, 128), 0.5)
    assert len(raw) == 2 * 128 // 4 + 32
    # block 0, byte 0 holds elements 0, 32, 64, 96 -> t = -1, +1, 0, -1 -> codes 0, 2, 1, 0 -> 0b00_10_01_00
    assert raw[0] == 0b00100100
    assert raw[64:68] == struct.pack("<f", 0.5) and raw[68:] == bytes(28)
    # byte 1: elements 1, 33, 65, 97 -> t = 0, -1, +1, 0 -> codes 1, 0, 2, 1 -> 0b01_00_10_01
    assert raw[1] == 0b01001001
    assert raw.hex() == ("244992" * 22)[:128] + "0000003f" + "00" * 28  # golden bytes
    vals, scale = decode_i2s(raw, 2, 128)
    np.testing.assert_array_equal(vals, t.numpy())
    assert scale == 0.5


# ---------------------------------------------------------------------------------------------------------------
# TQ2_0 / TQ1_0


@pytest.mark.parametrize("qtype,gtype", [("tq2_0", gguf.GGMLQuantizationType.TQ2_0),
                                         ("tq1_0", gguf.GGMLQuantizationType.TQ1_0)])
def test_tq_export_equals_gguf_quantizer(tmp_path, qtype, gtype):
    """With f16-exact scales our TQ bytes equal gguf.quants.quantize(scale · t): the upstream reference codec."""
    src = tmp_path / "m.bin"
    tern = make_packed(src, act="silu")
    out = tmp_path / "m.gguf"
    gc.packed_to_gguf(src, out, qtype=qtype)
    r = gguf.GGUFReader(out)  # the gguf package's own reader accepts the file
    assert r.fields["general.architecture"].contents() == "bitnet"
    assert r.fields["bitnet.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    by_name = {t.name: t for t in r.tensors}
    assert not any(n.endswith(".scale") for n in by_name)
    with PackedFile(src) as pf:
        for name, tq in tern.items():
            gname = gc.gguf_tensor_name(name)
            s = pf.ternary(name)[1].numpy()[0]
            expect = quants.quantize(tq.astype(np.float32) * s, gtype)
            assert by_name[gname].tensor_type == gtype
            np.testing.assert_array_equal(np.asarray(by_name[gname].data).reshape(expect.shape), expect)
            deq = quants.dequantize(np.asarray(by_name[gname].data), gtype).reshape(tq.shape)
            np.testing.assert_array_equal(deq, tq.astype(np.float32) * s)


def test_tq_non_f16_scale_goes_to_scale_tensor(tmp_path):
    src = tmp_path / "m.bin"
    tern = make_packed(src, act="silu", scales="f32")
    out = tmp_path / "m.gguf"
    gc.packed_to_gguf(src, out, qtype="tq2_0")
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with PackedFile(src) as pf:
        for name, tq in tern.items():
            gname = gc.gguf_tensor_name(name)
            sc = by_name[gname.replace(".weight", ".scale")]
            assert sc.tensor_type == gguf.GGMLQuantizationType.F32
            assert np.asarray(sc.data).reshape(-1)[0] == pf.ternary(name)[1].numpy()[0]
            deq = quants.dequantize(np.asarray(by_name[gname].data), gguf.GGMLQuantizationType.TQ2_0)
            np.testing.assert_array_equal(deq.reshape(tq.shape), tq.astype(np.float32))  # d = 1


def test_refusals(tmp_path):
    relu = tmp_path / "relu.bin"
    make_packed(relu, act="relu2")
    with pytest.raises(gc.GGUFConversionError, match="silently run as SiLU"):
        gc.packed_to_gguf(relu, tmp_path / "x.gguf", qtype="tq2_0")
    odd = tmp_path / "odd.bin"
    make_packed(odd, act="silu", hidden=256, inter=384)
    with pytest.raises(gc.GGUFConversionError, match="multiple of 256"):
        gc.packed_to_gguf(odd, tmp_path / "x.gguf", qtype="tq1_0")
    untied = tmp_path / "untied.bin"
    make_packed(untied, act="silu", tie=False)
    with pytest.raises(gc.GGUFConversionError, match="token_embd as the output head"):
        gc.packed_to_gguf(untied, tmp_path / "x.gguf", qtype="tq2_0")
    rows = tmp_path / "rows.bin"
    make_packed(rows, act="relu2", row_scales=True)
    with pytest.raises(gc.GGUFConversionError, match="per-row scales"):
        gc.packed_to_gguf(rows, tmp_path / "x.gguf", qtype="i2_s")
    no_merges = tmp_path / "no_merges.bin"  # byte-level BPE without merges: GGUF cannot say so (no empty arrays)
    from bitnet158.converter import random_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random_model, "MERGES", [])
        random_model.write_random_model(no_merges, random_model.model_config("2b4t", 1, 300), progress=False)
    with pytest.raises(gc.GGUFConversionError, match="without merges"):
        gc.packed_to_gguf(no_merges, tmp_path / "x.gguf", qtype="i2_s")
    assert not (tmp_path / "x.gguf").exists()
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(gc.GGUFConversionError, match="--force"):
        gc.packed_to_gguf(relu, existing, qtype="i2_s")
    assert existing.read_bytes() == b"keep"
    umask = os.umask(0o022)
    try:  # the written files get a new file's permissions (0666 less the umask), not a temp file's 0600
        gc.packed_to_gguf(relu, existing, qtype="i2_s", force=True)
        make_packed(again := tmp_path / "again.bin", act="relu2")
    finally:
        os.umask(umask)
    assert existing.read_bytes()[:4] == b"GGUF"
    assert not list(tmp_path.glob(".*.tmp"))  # failed exports left no temp files
    assert [stat.S_IMODE(p.stat().st_mode) for p in (existing, again)] == [0o644, 0o644]
    for fn, src in ((gc.packed_to_gguf, relu), (gc.gguf_to_packed, existing)):  # in place: it would replace the source
        before = src.read_bytes()
        with pytest.raises(gc.GGUFConversionError, match="is the source file"):
            fn(src, src, force=True)
        assert src.read_bytes() == before


@pytest.mark.parametrize("where", ["write", "fsync", "reserve"])
def test_export_disk_full_leaves_nothing(tmp_path, monkeypatch, where):
    src = tmp_path / "m.bin"
    make_packed(src, act="relu2")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def short_write(self, tensor, *args, **kwargs):  # what numpy's tofile raises on a full disk: no errno
        raise OSError(f"{tensor.nbytes} requested and 0 written")

    if where == "write":
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    elif where == "fsync":
        monkeypatch.setattr(os, "fsync", full)
    else:  # the file is reserved first, so a full disk is ENOSPC before numpy's short write
        monkeypatch.setattr(os, "posix_fallocate", full)
        monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", short_write)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(OSError, match=r"no space left on the device while writing .*m\.gguf .*nothing was written") as info:
        gc.packed_to_gguf(src, out, qtype="i2_s")
    assert info.value.errno == errno.ENOSPC and os.listdir(out.parent) == []


def test_export_reserves_exactly_the_gguf_size(tmp_path, monkeypatch):
    src = tmp_path / "m.bin"
    make_packed(src, act="silu")
    fine = tmp_path / "fine.gguf"
    sizes = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: (sizes.append(size), real(fd, offset, size)))
    gc.packed_to_gguf(src, fine, qtype="tq2_0")
    assert sizes == [fine.stat().st_size]  # the GGUF's exact size, not more


def test_an_existing_output_is_never_replaced_without_force(tmp_path, monkeypatch):
    src, late = tmp_path / "m.bin", tmp_path / "late.gguf"
    make_packed(src, act="silu")
    real_close = gguf.GGUFWriter.close

    def close(self):  # the output appears while the export writes
        real_close(self)
        late.write_bytes(b"keep")

    with monkeypatch.context() as mp:
        mp.setattr(gguf.GGUFWriter, "close", close)
        with pytest.raises(gc.GGUFConversionError, match="exists; pass --force"):
            gc.packed_to_gguf(src, late, qtype="tq2_0")
        assert late.read_bytes() == b"keep" and not list(tmp_path.glob(".*.tmp"))
        gc.packed_to_gguf(src, late, qtype="tq2_0", force=True)  # --force replaces it
    assert late.read_bytes()[:4] == b"GGUF"
    # a dangling symlink exists too; refused before the source is read (missing.bin is not there)
    for fn, source in ((gc.packed_to_gguf, tmp_path / "missing.bin"), (gc.gguf_to_packed, late)):
        dangling = tmp_path / f"dangling_{fn.__name__}"
        dangling.symlink_to(tmp_path / "nowhere")
        with pytest.raises(gc.GGUFConversionError, match="exists; pass --force"):
            fn(source, dangling)
        assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_config_that_does_not_match_the_tensors_is_refused(tmp_path, tiny):
    """The config is checked against the tensor table before anything is written: a missing layer is not a
    KeyError half way, a vocab_size beyond the embedding's rows does not size the GGUF's token arrays."""
    src = tmp_path / "m.bin"
    make_packed(src, act="silu")  # 2 layers, vocab 320, hidden 256, intermediate 512
    extra = (TensorSpec("layers.0.extra.weight", "bf16", (4,)), torch.ones(4, dtype=torch.bfloat16))
    for i, (edit, config, more, message) in enumerate((
        (lambda sp, t: None if sp.name.startswith("layers.1.") else (sp, t), None, (),
         r"tensor 'layers.1.attn_norm.weight' is missing \(and 10 more\); the file does not match its config"),
        (None, {"num_hidden_layers": 100}, (), "the config says 100 layers, but the file holds 38 tensors"),
        (None, {"vocab_size": 100_000}, (),
         r"'embed.weight' has shape \(320, 256\), the config implies \(100000, 256\) \(vocab_size 100000\)"),
        (None, {"intermediate_size": 256}, (),
         r"'layers.0.mlp.gate_proj.weight' has shape \(512, 256\), the config implies \(256, 256\)"),
        (None, None, [extra], "unexpected tensor 'layers.0.extra.weight' for a 1bitllm model with this config"),
    )):
        bad = tmp_path / f"bad{i}.bin"
        tiny.rewrite_packed(src, bad, edit, extra=more, config=config)
        with pytest.raises(gc.GGUFConversionError, match=message):
            gc.packed_to_gguf(bad, tmp_path / "x.gguf", qtype="tq2_0")
        assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_provenance_name_that_is_not_a_string_is_not_written(tmp_path):
    """general.name is the imported GGUF's name where the packed file has one (a string), else the source's."""
    src = tmp_path / "m.bin"
    make_packed(src, act="silu")
    for i, name in enumerate((5, ["a"], "named")):
        edited, out = tmp_path / f"p{i}.bin", tmp_path / f"p{i}.gguf"
        with PackedFile(src) as pf:
            specs = [TensorSpec(t.name, t.dtype, tuple(t.shape), t.scale, t.scale_granularity)
                     for t in pf.tensors.values()]
            with PackedWriter(edited, config=pf.config, tokenizer=pf.tokenizer,
                              provenance={**pf.provenance, "name": name}, tensors=specs) as w:
                for sp in specs:
                    w.write(sp.name, pf.torch(sp.name))
        gc.packed_to_gguf(edited, out, qtype="tq2_0")
        assert parse_gguf(out)[0]["general.name"] == ("named" if name == "named" else "m.bin")


# ---------------------------------------------------------------------------------------------------------------
# round trips through GGUFSource


def _assert_same_ternary(a: Path, b: Path) -> None:
    with PackedFile(a) as pa, PackedFile(b) as pb:
        ta = [n for n, i in pa.tensors.items() if i.dtype == "t2"]
        assert ta == [n for n, i in pb.tensors.items() if i.dtype == "t2"]
        for n in ta:
            (ca, sa), (cb, sb) = pa.ternary(n), pb.ternary(n)
            assert torch.equal(ca, cb), n
            assert torch.equal(sa, sb), n  # bit for bit, f32
        # every other tensor (embedding, norms, an untied head) keeps its values, whatever dtype carried it
        assert pa.tensors.keys() == pb.tensors.keys()
        for n in pa.tensors.keys() - set(ta):
            assert torch.equal(pa.torch(n).float(), pb.torch(n).float()), n
        assert pb.config["hidden_act"] == pa.config["hidden_act"]
        # the GGUF carries the embedding's spare rows as [PADi] tokens; the real vocab and the encoding are the same
        va = json.loads(pa.tokenizer["tokenizer_json"])["model"]["vocab"]
        vb = json.loads(pb.tokenizer["tokenizer_json"])["model"]["vocab"]
        assert {k: v for k, v in vb.items() if not k.startswith("[PAD")} == va
        text = "hello world, the lazy fox</s> [PAD319]"  # a spare row's name is text, not that row's id
        ta_, tb_ = (Tokenizer.from_str(p.tokenizer["tokenizer_json"]) for p in (pa, pb))
        assert ta_.encode(text).ids == tb_.encode(text).ids
        assert pb.tokenizer["chat_template"] == pa.tokenizer["chat_template"]


@pytest.mark.parametrize("qtype,act,scales,rows", [
    ("i2_s", "relu2", "f32", False),
    ("i2_s", "silu", "f16", False),
    ("tq2_0", "silu", "f16", False),
    ("tq2_0", "silu", "f32", False),
    ("tq1_0", "silu", "f16", True),
    ("tq1_0", "silu", "f32", False),
])
def test_round_trip_bit_exact(tmp_path, qtype, act, scales, rows):
    src = tmp_path / "m.bin"
    make_packed(src, act=act, scales=scales, row_scales=rows)
    g = tmp_path / "m.gguf"
    gc.packed_to_gguf(src, g, qtype=qtype)
    back = tmp_path / "back.bin"
    gc.gguf_to_packed(g, back)
    _assert_same_ternary(src, back)
    with PackedFile(back) as pb:
        assert pb.provenance["gguf_architecture"] == ("bitnet-b1.58" if act == "relu2" and qtype == "i2_s" else "bitnet")
        assert pb.provenance["files"][g.name] == hashlib.sha256(g.read_bytes()).hexdigest()
        # I2_S: F16 embedding as Microsoft's; TQ: the packed file's bf16 kept (BF16 GGUF tensor); norms F32
        assert pb.tensors["embed.weight"].dtype == ("f16" if qtype == "i2_s" else "bf16")
        assert pb.tensors["norm.weight"].dtype == "f32"
    # and once more: the re-imported file exports to the same GGUF tensors, shapes, types and bytes
    g2 = tmp_path / "m2.gguf"
    gc.packed_to_gguf(back, g2, qtype=qtype)
    kv1, t1 = parse_gguf(g)
    kv2, t2 = parse_gguf(g2)
    # ... and the same metadata: the name the first export wrote, not the re-imported file's name
    assert kv1 == kv2 and kv1["general.name"] == "m.bin"
    start1, start2 = min(o for *_, o in t1.values()), min(o for *_, o in t2.values())
    assert {n: (d, t, o - start1) for n, (d, t, o) in t1.items()} == {n: (d, t, o - start2) for n, (d, t, o) in t2.items()}
    assert g.read_bytes()[start1:] == g2.read_bytes()[start2:]


def test_metadata_and_values_gguf_cannot_hold(tmp_path, tiny, caplog, monkeypatch):
    """Values GGUF's types cannot hold are refused, not wrapped or written as inf; stop ids go as eos, eot, eom."""
    src = tmp_path / "m.bin"
    make_packed(src, act="relu2")
    for i, (edit, config, message) in enumerate((
        (None, {"max_position_embeddings": 2**32}, "config max_position_embeddings 4294967296 does not fit GGUF's uint32"),
        (None, {"rope_theta": 1e39}, "config rope_theta 1e.39 does not fit GGUF's float32"),
        (None, {"rms_norm_eps": 1e-50}, "config rms_norm_eps 1e-50 does not fit GGUF's float32"),  # would be 0
        # bf16 holds 1e5, I2_S's F16 embedding does not; an inf already there does not hide them
        (lambda sp, t: (sp, t.index_fill(0, torch.tensor([5]), 1e5)) if sp.name == "embed.weight" else (sp, t), None,
         "embed.weight: 256 values are beyond F16's range and would be written as inf"),
        (lambda sp, t: (sp, t.index_fill(0, torch.tensor([5]), 1e5).index_fill(0, torch.tensor([6]), float("inf")))
         if sp.name == "embed.weight" else (sp, t), None,
         "embed.weight: 256 values are beyond F16's range and would be written as inf"),
    )):
        bad = tmp_path / f"bad{i}.bin"
        with monkeypatch.context() as m:  # PackedWriter refuses a length past 2^22 (formats/config.py); a file of
            m.setattr(ModelConfig, "from_dict", classmethod(lambda cls, d: None))  # another writer can hold it
            tiny.rewrite_packed(src, bad, edit, config=config)
        with pytest.raises(gc.GGUFConversionError, match=message):
            gc.packed_to_gguf(bad, tmp_path / "x.gguf", qtype="i2_s")
        assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".*.tmp"))
    # "</s>" (id 1) is a stop that llama.cpp, and our reader, find by its text: with another EOS it needs no key
    s_as_eos = {"eos_token": json.loads(_tokenizer()["tokenizer_json"])["added_tokens"][0]["content"]}  # "<s>", id 0
    for n, (eos, tok, back) in enumerate((([1, 5, 7], None, [1, 5, 7]), ([1, 5, 7, 9], None, [1, 5, 7]),
                                          ([1, 5, 7, 0], s_as_eos, [0, 5, 7, 1]))):
        caplog.clear()
        stops = tmp_path / f"stops{n}.bin"
        tiny.rewrite_packed(src, stops, config={"eos_token_id": eos}, tokenizer=tok)
        with caplog.at_level(logging.WARNING, logger="bitnet158.converter.gguf_convert"):
            gc.packed_to_gguf(stops, tmp_path / f"s{n}.gguf", qtype="i2_s")
        assert ("not written" in caplog.text) == (n == 1) and ("stop ids [9]" in caplog.text) == (n == 1)
        gc.gguf_to_packed(tmp_path / f"s{n}.gguf", tmp_path / f"s{n}.bin")
        with PackedFile(tmp_path / f"s{n}.bin") as pf:
            assert pf.config["eos_token_id"] == back


def test_bos_and_eos_tokens_survive_the_round_trip(tmp_path, tiny):
    """The tokenizer's EOS is written as eos, whatever the config's order of stop ids: its text comes back as the
    eos_token that a chat template writes. A config without a BOS id writes the tokenizer's BOS, which the reader
    needs where the tokenizer adds one; with neither, a tokenizer that adds a BOS is refused."""
    src = tmp_path / "m.bin"
    make_packed(src, act="silu")
    for i, (config, tokenizer, bos, eos) in enumerate((
        ({"eos_token_id": [5, 1]}, {}, 0, [1, 5]),  # "</s>" is id 1
        ({"bos_token_id": None}, {"add_bos_token": True}, 0, [1]),  # "<s>" is id 0
    )):
        edited, back = tmp_path / f"e{i}.bin", tmp_path / f"b{i}.bin"
        tiny.rewrite_packed(src, edited, config=config, tokenizer=tokenizer)
        gc.packed_to_gguf(edited, tmp_path / f"e{i}.gguf", qtype="tq2_0")
        gc.gguf_to_packed(tmp_path / f"e{i}.gguf", back)
        with PackedFile(back) as pf:
            assert (pf.config["bos_token_id"], pf.config["eos_token_id"]) == (bos, eos)
            assert (pf.tokenizer["bos_token"], pf.tokenizer["eos_token"]) == ("<s>", "</s>")
    tiny.rewrite_packed(src, tmp_path / "nobos.bin", config={"bos_token_id": None},
                        tokenizer={"add_bos_token": True, "bos_token": None})  # fmt: skip
    with pytest.raises(gc.GGUFConversionError, match="the tokenizer adds a BOS, but the file names no BOS token"):
        gc.packed_to_gguf(tmp_path / "nobos.bin", tmp_path / "nobos.gguf", qtype="tq2_0")


def _edited_tokenizer(edit) -> dict:
    tok = _tokenizer()
    tj = json.loads(tok["tokenizer_json"])
    edit(tj)
    return {**tok, "tokenizer_json": json.dumps(tj)}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


@pytest.mark.parametrize("edit,message", [
    # a split GGUF cannot name would read back (here and in llama.cpp) as the GPT-2 one: other text ids
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [_split(r"\p{N}+| ?\p{L}+|\s+"),
                                                                               _BYTE_LEVEL]}),
     r"splits by \['\\\\p\{N\}.*which has no tokenizer.ggml.pre name here"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        _split(gguf_fmt.LLAMA3_SPLIT_REGEX), _split(r"\p{N}"), _BYTE_LEVEL]}), "no tokenizer.ggml.pre name here"),
    # the Llama-3 split before a ByteLevel that splits again, or a Digits split: no name reads back as either
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        _split(gguf_fmt.LLAMA3_SPLIT_REGEX), {**_BYTE_LEVEL, "use_regex": True}]}),
     r"pre-tokenizer \['Split', 'ByteLevel'\] .*no tokenizer.ggml.pre name"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {**_BYTE_LEVEL, "use_regex": True}]}),
     r"pre-tokenizer \['Digits', 'ByteLevel'\] that splits by no regex"),
    (lambda tj: tj["pre_tokenizer"].update(add_prefix_space=True), "adds a prefix space"),
    (lambda tj: tj.update(normalizer={"type": "Lowercase"}), r"has a normalizer \(Lowercase\)"),
    (lambda tj: tj["model"].update(dropout=0.1, end_of_word_suffix="</w>"),
     "BPE model sets dropout, end_of_word_suffix"),
    (lambda tj: tj["added_tokens"][1].update(lstrip=True), "matches added token '</s>' with lstrip"),
    # ignore_merges (GGUF's gpt-2 never ignores them) where the merges do not make a token of the vocabulary whole
    (lambda tj: (tj["model"].update(ignore_merges=True), tj["model"]["vocab"].update({"zq": 310})),
     "ignores merges for words in its vocabulary .* split the token 'zq'"),
    (lambda tj: tj["model"]["merges"].insert(0, "nospace"), r"malformed .*merge 'nospace' is not two tokens"),
    (lambda tj: tj["model"]["merges"].insert(0, ["a b", "c"]), r"malformed .*merge 'a b c' is not two tokens"),
    (lambda tj: tj.update(model={"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["a", -1.0]]}),
     "tokenizer model type 'Unigram' cannot be written to GGUF here"),
    (lambda tj: tj["model"].pop("vocab"), r"malformed vocab, added_tokens or merges \(KeyError: 'vocab'\)"),
    (lambda tj: tj["model"]["merges"].insert(0, [1, 2]), r"malformed .*TypeError"),
    (lambda tj: tj["added_tokens"][0].update(id="x"), r"malformed .*ValueError"),
    # a normalizer or pre-tokenizer of the wrong shape: one error, not a traceback
    (lambda tj: tj.update(normalizer={"type": ["x"]}), r"malformed normalizer, pre_tokenizer or model \(TypeError"),
    (lambda tj: tj.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": 5}]}),
     r"malformed normalizer, pre_tokenizer or model \(TypeError"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Sequence", "pretokenizers": 5}), r"malformed .*\(TypeError"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Split", "pattern": "x"}), r"malformed .*\(AttributeError"),
])
def test_tokenizers_gguf_cannot_hold_are_refused(edit, message):
    """A tokenizer that GGUF's metadata cannot describe (so that its GGUF would tokenize text differently), or a
    malformed one, is one GGUFConversionError, not a GGUF that reads back as another tokenizer or a traceback."""
    with pytest.raises(gc.GGUFConversionError, match=message):
        gc.tokenizer_metadata(_edited_tokenizer(edit), 320)


def test_a_tokenizer_nested_too_deep_is_one_error():
    # JSON nested past Python's stack: packed-to-gguf's error and inspect's line, not a RecursionError traceback
    from bitnet158.formats.packed import tokenizer_summary

    deep = {**_tokenizer(), "tokenizer_json": "[" * 100_000 + "]" * 100_000}
    with pytest.raises(gc.GGUFConversionError, match="tokenizer_json is not a tokenizers serialization: maximum"):
        gc.tokenizer_metadata(deep, 320)
    assert tokenizer_summary(deep)[0].startswith("  tokenizer_json: unreadable (maximum recursion depth")


def test_tokenizer_pre_names():
    # the splits GGUF can name: the Llama-3 split alone is llama-bpe, a plain ByteLevel gpt-2
    llama3 = _edited_tokenizer(lambda tj: tj.update(pre_tokenizer={
        "type": "Sequence", "pretokenizers": [_split(gguf_fmt.LLAMA3_SPLIT_REGEX), _BYTE_LEVEL]}))
    assert gc.tokenizer_metadata(llama3, 320).pre == "llama-bpe"
    assert gc.tokenizer_metadata(_tokenizer(), 320).pre == "gpt-2"
    empty = _edited_tokenizer(lambda tj: tj.update(normalizer={"type": "Sequence", "normalizers": []}))
    assert gc.tokenizer_metadata(empty, 320).pre == "gpt-2"  # a normalizer that changes nothing
    # ignore_merges either way where every token of the vocabulary is its own merges' result (a trained BPE): the
    # same ids. The demo model's Llama-3 split says false; llama-bpe's readers ignore merges
    for pre, ignore in (("llama-bpe", False), ("gpt-2", True)):
        tok = llama3 if pre == "llama-bpe" else _tokenizer()
        tj = json.loads(tok["tokenizer_json"])
        tj["model"]["ignore_merges"] = ignore
        assert gc.tokenizer_metadata({**tok, "tokenizer_json": json.dumps(tj)}, 320).pre == pre


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_metadata_round_trip(tmp_path, tiny, kind, caplog):
    """The converter's tokenizers (byte-level BPE -> gpt2; SentencePiece -> llama with scores) survive
    packed -> GGUF -> packed: the re-imported tokenizer encodes like the original."""
    from bitnet158.converter.tokenizer import normalize_tokenizer
    from bitnet158.runtime.tokenizer import Tokenizer as RtTokenizer

    folder = (tiny.bpe_tokenizer if kind == "bpe" else tiny.sentencepiece_tokenizer)(tmp_path / "tok")
    tok, _, facts = normalize_tokenizer(folder)
    src = tmp_path / "m.bin"
    make_packed(src, act="silu", tokenizer=(tok, facts))
    g = tmp_path / "m.gguf"
    with caplog.at_level(logging.WARNING, logger="bitnet158.converter.gguf_convert"):
        gc.packed_to_gguf(src, g, qtype="tq2_0")
    # the one difference GGUF keeps (below), said at export
    assert ("prepends '▁' once, at the start of the text" in caplog.text) == (kind == "sentencepiece")
    kv, _ = parse_gguf(g)
    assert kv["tokenizer.ggml.model"] == ("gpt2" if kind == "bpe" else "llama")
    assert kv.get("tokenizer.ggml.pre") == ("gpt-2" if kind == "bpe" else None)
    if kind == "sentencepiece":
        assert kv["tokenizer.ggml.add_space_prefix"] is True
        types = kv["tokenizer.ggml.token_type"]
        assert types[0] == 2 and types[1] == 3 and types[2] == 3  # <unk> UNKNOWN, <s> </s> CONTROL
        assert 6 in types  # byte-fallback tokens
    back = tmp_path / "back.bin"
    gc.gguf_to_packed(g, back)
    with PackedFile(src) as pa, PackedFile(back) as pb:
        ta = RtTokenizer(pa.tokenizer, pa.config["eos_token_id"])
        tb = RtTokenizer(pb.tokenizer, pb.config["eos_token_id"])
        for text in tiny.ENCODE_SAMPLES + ["The quick brown fox jumps over the lazy dog."]:
            if kind == "sentencepiece" and text[:1].isspace():
                # GGUF's llama vocab always prepends "▁" (add_space_prefix, as SentencePiece and llama.cpp do);
                # the HF Metaspace prepend_scheme "first" skips it before a leading space: the gap warned of
                continue
            assert tb.encode(text) == ta.encode(text), text
        assert pb.config["bos_token_id"] == pa.config["bos_token_id"]


def test_llama3_pre_tokenizer_detected():
    from tokenizers import Regex

    from bitnet158.formats.gguf import LLAMA3_SPLIT_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=280, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    meta = gc.tokenizer_metadata({"tokenizer_json": tok.to_str()}, 300)
    assert (meta.model, meta.pre) == ("gpt2", "llama-bpe")
    with pytest.raises(gc.GGUFConversionError, match=r"tokenizer has token id \d+ but the model's vocab_size is 100"):
        gc.tokenizer_metadata({"tokenizer_json": tok.to_str()}, 100)


def test_configs_the_gguf_graphs_cannot_run_are_refused(tmp_path):
    # what the bitnet GGUF graphs hard-code, each checked on a real file's config with one key changed
    make_packed(src := tmp_path / "m.bin", act="relu2")
    with PackedFile(src) as pf:
        cfg = pf.config
    assert gc._check_exportable(cfg, "i2_s") == "bitnet-b1.58"
    for change, message in (
        ({"head_dim": cfg["head_dim"] * 2}, r"num_attention_heads × head_dim = \d+ differs from hidden_size"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "cannot be expressed in a bitnet GGUF"),
        ({"rope_style": "interleaved"}, "rope_style 'interleaved': the bitnet GGUF graphs use NeoX rope"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' has no bitnet.cpp graph"),
    ):
        with pytest.raises(gc.GGUFConversionError, match=message):
            gc._check_exportable({**cfg, **change}, "i2_s")
    with pytest.raises(gc.GGUFConversionError, match="multiple of 128 .*; tensor w has 320 columns"):
        gc._check_rows("w", (4, 320), "i2_s")
    # per-row scales ride in TQ's f16 block scales only when f16 holds them exactly
    make_packed(rows := tmp_path / "rows.bin", act="silu", row_scales=True, scales="f32")
    with pytest.raises(gc.GGUFConversionError, match="has per-row scales that are not exact in f16"):
        gc.packed_to_gguf(rows, tmp_path / "x.gguf", qtype="tq2_0")
    with pytest.raises(gc.GGUFConversionError, match="unknown GGUF type 'q4_0'; choose one of"):
        gc.packed_to_gguf(src, tmp_path / "x.gguf", qtype="q4_0")
    gc.packed_to_gguf(src, tmp_path / "x.gguf", qtype="i2_s")
    (tmp_path / "back.bin").write_bytes(b"keep")
    with pytest.raises(gc.GGUFConversionError, match="back.bin exists; pass --force"):
        gc.gguf_to_packed(tmp_path / "x.gguf", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"keep"


def test_a_model_without_sub_norms_is_not_exported(llama_bitnet_ckpt, tmp_path):
    # bitnet.cpp's and llama.cpp's bitnet graphs always apply the sub-norms: a Llama-BitNet file would run as
    # another network there
    from bitnet158.converter.hf import convert_hf

    src = tmp_path / "llama.bin"
    convert_hf(str(llama_bitnet_ckpt.path), str(src), progress=False)
    with pytest.raises(gc.GGUFConversionError, match="the model has no attention/MLP sub-norms"):
        gc.packed_to_gguf(src, tmp_path / "x.gguf", qtype="tq2_0")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_commands(tmp_path):
    from bitnet158.converter.cli import main

    src = tmp_path / "m.bin"
    make_packed(src, act="relu2")
    out = tmp_path / "m.gguf"
    runner = CliRunner()
    r = runner.invoke(main, ["packed-to-gguf", str(src), "-o", str(out), "--type", "i2_s"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["packed-to-gguf", str(src), "-o", str(out), "--type", "tq2_0", "--force"])
    assert r.exit_code == 1 and "error:" in r.output and "SiLU" in r.output and "Traceback" not in r.output
    back = tmp_path / "back.bin"
    r = runner.invoke(main, ["gguf-to-packed", str(out), "-o", str(back), "--activation", "silu"])
    assert r.exit_code == 0, r.output
    with PackedFile(back) as pb:
        assert pb.config["hidden_act"] == "silu"
    r = runner.invoke(main, ["gguf-to-packed", str(out), "-o", str(back)])
    assert r.exit_code != 0 and "--force" in r.output


def test_inspect_a_gguf(tmp_path):
    # `bitnet-convert inspect` reads a GGUF as it reads a packed file; --verify decodes every tensor, so a code 3
    # in a TQ2_0 weight (GGUF has no checksums) fails it, while the plain summary still prints
    from bitnet158.converter.cli import main
    from bitnet158.formats.gguf import GGUFFile

    src = tmp_path / "m.bin"
    make_packed(src, act="silu")
    out = tmp_path / "m.gguf"
    gc.packed_to_gguf(src, out, qtype="tq2_0")
    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert f"{out}: GGUF version 3, architecture bitnet, " in r.output and '  hidden_act: "silu"' in r.output
    assert re.search(r"  blk\.0\.attn_q\.weight +TQ2_0 +256x256 +\d+ +\d+  layers\.0\.attn\.q_proj\.weight", r.output)
    assert "bits per ternary weight (incl. scales): 2.0625" in r.output and "verify: OK" in r.output
    with GGUFFile(out) as f:
        at = f.tensors["blk.0.attn_q.weight"].offset
    raw = bytearray(out.read_bytes())
    raw[at] = 0xFF  # four codes 3
    out.write_bytes(raw)
    assert runner.invoke(main, ["inspect", str(out)]).exit_code == 0
    r = runner.invoke(main, ["inspect", str(out), "--verify"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "code 3" in r.output, r.output


def test_gguf_to_packed_from_the_hub(tiny, tmp_path, monkeypatch):
    # org/name (its one GGUF) and org/name/file.gguf, from an offline hub cache, convert like the local file; a
    # repository with several GGUFs, a missing one and a bad name each give one error line
    from bitnet158.converter.cli import main

    src = tmp_path / "m.bin"
    make_packed(src, act="relu2")
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    gc.packed_to_gguf(src, one / "ggml-model-i2_s.gguf", qtype="i2_s")
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(one / "ggml-model-i2_s.gguf", two / name)
    tiny.offline_hub_cache(one, "tiny-org/one", "1" * 40, tmp_path, monkeypatch)
    tiny.offline_hub_cache(two, "tiny-org/two", "2" * 40, tmp_path, monkeypatch)
    (readme := tmp_path / "readme").mkdir()
    (readme / "README.md").write_text("no model here")
    tiny.offline_hub_cache(readme, "tiny-org/readme", "4" * 40, tmp_path, monkeypatch)
    # the hub lists a repository (a cache may hold only part of it: here a config.json, where the hub has a GGUF);
    # where it cannot, the cache does
    import huggingface_hub

    (part := tmp_path / "part").mkdir()
    (part / "config.json").write_text("{}")
    tiny.offline_hub_cache(part, "tiny-org/part", "5" * 40, tmp_path, monkeypatch)
    listed = []

    def listing(self, repo, *args, **kwargs):
        listed.append(repo)
        if repo == "tiny-org/part":
            return ["config.json", "model.gguf"]
        raise OSError("no network\n  (a second line)")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    runner = CliRunner()
    for spec in ("tiny-org/one", "tiny-org/one/ggml-model-i2_s.gguf", "tiny-org/two/b.gguf"):
        out = tmp_path / f"{spec.replace('/', '_')}.bin"
        r = runner.invoke(main, ["gguf-to-packed", spec, "-o", str(out)])
        assert r.exit_code == 0, r.output
        _assert_same_ternary(src, out)
        with PackedFile(out) as pf:
            repo, name = spec.rsplit("/", 1) if spec.endswith(".gguf") else (spec, "ggml-model-i2_s.gguf")
            assert pf.provenance["source"] == f"{repo}/{name}"
            assert pf.provenance["revision"] == {"tiny-org/one": "1" * 40, "tiny-org/two": "2" * 40}[repo]
    for spec, message in (
        ("tiny-org/two", "tiny-org/two holds 2 GGUF files (a.gguf, b.gguf); name one as tiny-org/two/FILE.gguf"),
        ("tiny-org/none", "cannot read tiny-org/none: no such file, nor from the hub"),
        ("tiny-org/readme", "tiny-org/readme holds no GGUF file; name the model file as tiny-org/readme/FILE"),
        ("no-such-file.gguf", "cannot read no-such-file.gguf: No such file or directory"),
        ("models/x.gguf", "cannot read models/x.gguf: No such file or directory"),  # a path, not a repository
        ("tiny-org/part", "cannot read tiny-org/part: no such file, nor from the hub"),  # model.gguf: not cached
    ):
        r = runner.invoke(main, ["gguf-to-packed", spec, "-o", str(tmp_path / "x.bin")])
        assert r.exit_code == 1 and r.output.startswith(f"error: {message}") and len(r.output.splitlines()) == 1, r.output
    assert listed == ["tiny-org/one", "tiny-org/two", "tiny-org/none", "tiny-org/readme", "tiny-org/part"]
    # the runtime and bitnet-compare read the same specs
    from bitnet158.compare.cli import main as compare_main
    from bitnet158.runtime import load

    tiny.offline_hub_cache(tiny.microsoft_packed(tmp_path / "ckpt").path, "tiny-org/ckpt", "3" * 40, tmp_path,
                           monkeypatch)  # fmt: skip
    with pytest.raises(ValueError, match="tiny-org/ckpt holds no GGUF file but a Hugging Face checkpoint: convert it "
                                         "first: bitnet-convert hf-to-packed tiny-org/ckpt -o model.bin"):
        load("tiny-org/ckpt", device="cpu")
    local = load(one / "ggml-model-i2_s.gguf", device="cpu")
    assert torch.equal(load("tiny-org/one", device="cpu").logits([1, 5, 9]), local.logits([1, 5, 9]))
    r = runner.invoke(compare_main, ["tiny-org/two/a.gguf", str(one / "ggml-model-i2_s.gguf"), "--json", "-p", "a b"])
    assert r.exit_code == 0 and json.loads(r.stdout)["max_abs_logit_diff"] == 0.0, r.output


# ---------------------------------------------------------------------------------------------------------------
# logits: a GGUF written with gguf's own quantizers runs like the packed file


@pytest.mark.parametrize("gtype", [gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.TQ1_0])
def test_oracle_gguf_logits_equal_packed(tmp_path, gtype):
    from bitnet158 import runtime as rt

    src = tmp_path / "m.bin"
    tern = make_packed(src, act="silu")
    oracle = tmp_path / "oracle.gguf"
    with PackedFile(src) as pf:
        w = gguf.GGUFWriter(oracle, "bitnet")
        gc._add_metadata(w, pf.config, pf.tokenizer, pf.provenance,
                         "tq2_0" if gtype == gguf.GGMLQuantizationType.TQ2_0 else "tq1_0")
        for name, info in pf.tensors.items():
            if name.endswith("_scale"):
                continue
            gname = gc.gguf_tensor_name(name)
            if info.dtype == "t2":
                s = pf.ternary(name)[1].numpy()[0]
                w.add_tensor(gname, quants.quantize(tern[name].astype(np.float32) * s, gtype), raw_dtype=gtype)
            elif name == "embed.weight":
                w.add_tensor(gname, pf.torch(name).float().numpy().astype(np.float16))
            else:
                w.add_tensor(gname, pf.torch(name).float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    ids = [0, 5, 17, 42, 99, 3]
    ref = rt.load(str(src), device="cpu")
    got = rt.load(str(oracle), device="cpu")
    la, lb = ref.logits(ids), got.logits(ids)
    # the embedding went bf16 -> f16 exactly, codes and scales are identical: the logits are equal
    torch.testing.assert_close(lb, la, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp itself as a peer (only where llama-cpp-python is installed)


def _q8k_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """ggml's Q8_K activation quantization, dequantized: per 256-block iscale = -127 / (largest-magnitude value),
    q = min(127, round(iscale · x))."""
    xb = x.float().reshape(x.shape[0], -1, 256)
    mx = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
    iscale = torch.where(mx == 0, torch.zeros_like(mx), -127.0 / mx)
    q = (xb * iscale).round().clamp(max=127)
    return torch.where(mx == 0, torch.zeros_like(xb), q / iscale).reshape(x.shape)


@pytest.mark.slow
@pytest.mark.parametrize("qtype,scales", [("tq2_0", "f32"), ("tq1_0", "f16")])
def test_llama_cpp_runs_our_tq_export(tmp_path, qtype, scales, monkeypatch, tiny):
    """llama.cpp loads our TQ file and computes the same logits as our graph once both use its activation
    quantization (Q8_K) and f32 everywhere else: the file, the .scale tensors and the two graphs agree."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from bitnet158 import runtime as rt
    from bitnet158.runtime.bitlinear import BitLinear

    src = tmp_path / "m.bin"
    make_packed(src, act="silu", scales=scales)
    f32 = tmp_path / "m32.bin"  # the same model with an f32 embedding, so llama.cpp's head runs in f32
    tiny.rewrite_packed(src, f32, lambda s, t: (replace(s, dtype="f32"), t.float()) if s.dtype == "bf16" else (s, t))
    g = tmp_path / "m.gguf"
    gc.packed_to_gguf(f32, g, qtype=qtype)
    ids = [0, 5, 17, 42, 99, 3, 200, 150, 77, 12]
    llm = llama_cpp.Llama(model_path=str(g), n_threads=2, n_ctx=64, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    theirs = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    del llm

    def q8k_forward(self, x):
        x2 = x.reshape(-1, self.in_features)
        y = _q8k_fake_quant(x2) @ self.unpacked().float().t() * self.scale
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    model = rt.load(str(f32), device="cpu")
    ours_int8 = model.logits(ids)
    monkeypatch.setattr(BitLinear, "forward", q8k_forward)
    ours_q8k = model.logits(ids)
    torch.testing.assert_close(theirs, ours_q8k, rtol=0, atol=1e-3)
    assert bool((theirs.argmax(-1) == ours_int8.argmax(-1)).all())  # with BitNet's own int8 activations: same top-1


def test_compare_packed_with_its_gguf_exports(tmp_path):
    """bitnet-compare on a packed file and its own exports: the runtime reads the GGUFs to the same model."""
    from bitnet158.compare.core import compare_models, open_model

    src = tmp_path / "m.bin"
    make_packed(src, act="silu", scales="f32")
    for q in ("tq2_0", "tq1_0", "i2_s"):
        g = tmp_path / f"m-{q}.gguf"
        gc.packed_to_gguf(src, g, qtype=q)
        with open_model(str(src), device="cpu") as a, open_model(str(g), device="cpu") as b:
            res = compare_models(a, b, "hello world, the lazy fox", gen_tokens=3, max_kl=0.0, min_top1=1.0)
        # I2_S stores the embedding as F16 (Microsoft's layout): exact here only because these values fit f16
        assert res.max_abs_logit_diff == 0.0 and res.violations == [] and res.divergence.first_diff is None, q


def test_gguf_to_packed_refuses_varying_block_scales(tmp_path):
    """A TQ2_0 tensor quantized by gguf from non-ternary floats has a different d per block: no packed scale
    can carry that, so the import stops with one clear error and leaves no file."""
    from bitnet158.converter.cli import main

    src = tmp_path / "m.bin"
    tern = make_packed(src, act="silu")
    g = tmp_path / "varying.gguf"
    rng = np.random.default_rng(0)
    with PackedFile(src) as pf:
        w = gguf.GGUFWriter(g, "bitnet")
        gc._add_metadata(w, pf.config, pf.tokenizer, pf.provenance, "tq2_0")
        for name, info in pf.tensors.items():
            if name.endswith("_scale"):
                continue
            gname = gc.gguf_tensor_name(name)
            if info.dtype == "t2":
                x = tern[name].astype(np.float32) * rng.uniform(0.5, 1.5, (tern[name].shape[0], 1)).astype(np.float32)
                if name == "layers.1.mlp.down_proj.weight":  # 512 columns: two blocks per row
                    x = rng.standard_normal(tern[name].shape).astype(np.float32)  # block absmax varies in a row
                w.add_tensor(gname, quants.quantize(x, gguf.GGMLQuantizationType.TQ2_0),
                             raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
            else:
                w.add_tensor(gname, pf.torch(name).float().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    out = tmp_path / "out.bin"
    r = CliRunner().invoke(main, ["gguf-to-packed", str(g), "-o", str(out)])
    assert r.exit_code == 1 and "error:" in r.output and "blk.1.ffn_down.weight" in r.output, r.output
    assert "vary within row" in r.output and not out.exists() and not list(tmp_path.glob(".*tmp*"))
