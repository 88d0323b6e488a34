"""GGUF reading (formats/gguf.py): the ternary codecs, the container reader, GGUFSource, hostile files.

Oracles: gguf-py's own TQ1_0/TQ2_0 quantizers and dequantizers (gguf.quants), gguf.GGUFWriter for the files, an
I2_S decoder written here from the layout in REFERENCE.md §6, hand-derived golden bytes, SentencePiece itself
and a BPE tokenizer trained here with `tokenizers`.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from bitnet158.formats import gguf as G

RNG = np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------
# helpers independent of the module under test


def codes_to_t2(t: np.ndarray) -> np.ndarray:
    """int t [out, in] in {-1,0,1} -> t2 [out, ceil(in/4)] per PACKED.md §2.1 (weight 4j+k at bits 2k)."""
    out, n = t.shape
    c = np.ones((out, -(-n // 4) * 4), np.uint8)
    c[:, :n] = t + 1
    c = c.reshape(out, -1, 4).astype(np.uint32)
    return (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).astype(np.uint8)


def t2_to_codes(t2: np.ndarray, n: int) -> np.ndarray:
    b = t2.astype(np.int16)
    c = np.stack([(b >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(t2.shape[0], -1)
    return (c[:, :n] - 1).astype(np.int8)


def decode_i2s_independent(raw: bytes, out: int, n: int) -> tuple[np.ndarray, float]:
    """I2_S per REFERENCE §6, element by element: byte b of block k holds 128k + 32g + b at bits 7-6 - 2g."""
    buf = np.frombuffer(raw, np.uint8)
    total = out * n
    t = np.empty(total, np.int8)
    for e in range(total):
        blk, within = divmod(e, 128)
        g, b = divmod(within, 32)
        t[e] = ((int(buf[blk * 32 + b]) >> (6 - 2 * g)) & 3) - 1
    scale = struct.unpack_from("<f", buf, total // 4)[0]
    return t.reshape(out, n), scale


def random_ternary(out: int, n: int) -> np.ndarray:
    return RNG.integers(-1, 2, size=(out, n)).astype(np.int8)


# ------------------------------------------------------------------------------------------------
# codecs


@pytest.mark.parametrize("shape", [(4, 128), (3, 384), (16, 1024)])
def test_i2s_round_trip_and_independent_decoder(shape):
    t = random_ternary(*shape)
    t2 = codes_to_t2(t)
    raw = G.t2_to_i2s(t2, shape, 0.0371)
    assert len(raw) == shape[0] * shape[1] // 4 + 32
    assert raw[-28:] == bytes(28)  # filler is zeros when we write
    ref_t, ref_s = decode_i2s_independent(raw, *shape)
    assert np.array_equal(ref_t, t)
    assert ref_s == np.float32(0.0371)
    back, s = G.i2s_to_t2(raw, shape)
    assert np.array_equal(back, t2) and s == float(np.float32(0.0371))
    # torch input works the same
    assert G.t2_to_i2s(torch.from_numpy(t2), shape, 0.0371) == raw


def test_i2s_golden_bytes():
    """A (1, 128) tensor: +1 at 0, -1 at 33, -1 at 64, +1 at 127, else 0; scale 0.5. Derived by hand:
    zeros are code 1 -> 0b01 in each pair -> 0x55. Byte 0 holds elements 0 (bits 7-6), 32, 64 (bits 3-2), 96:
    +1 -> 0b10, -1 -> 0b00 -> 0b10_01_00_01 = 0x91. Byte 1 holds 1, 33 (bits 5-4), 65, 97 -> 0b01_00_01_01 = 0x45.
    Byte 31 holds 31, 63, 95, 127 (bits 1-0) -> 0b01_01_01_10 = 0x56. Then f32 0.5 = 00 00 00 3f, 28 zeros."""
    t = np.zeros((1, 128), np.int8)
    t[0, 0], t[0, 33], t[0, 64], t[0, 127] = 1, -1, -1, 1
    golden = bytes([0x91, 0x45] + [0x55] * 29 + [0x56]) + bytes([0, 0, 0, 0x3F]) + bytes(28)
    assert G.t2_to_i2s(codes_to_t2(t), (1, 128), 0.5) == golden
    t2, s = G.i2s_to_t2(golden, (1, 128))
    assert np.array_equal(t2_to_codes(t2, 128), t) and s == 0.5


def test_i2s_refuses_bad_payloads():
    t2 = codes_to_t2(random_ternary(2, 128))
    raw = bytearray(G.t2_to_i2s(t2, (2, 128), 1.0))
    with pytest.raises(G.GGUFFormatError, match="needs"):
        G.i2s_to_t2(bytes(raw[:-1]), (2, 128))
    with pytest.raises(G.GGUFFormatError, match="multiple of 128"):
        G.i2s_to_t2(bytes(raw), (4, 64))
    bad = bytearray(raw)
    bad[5] = 0xFF
    with pytest.raises(G.GGUFFormatError, match="code 3"):
        G.i2s_to_t2(bytes(bad), (2, 128))
    bad = bytearray(raw)
    bad[64:68] = struct.pack("<f", float("nan"))
    with pytest.raises(G.GGUFFormatError, match="scale"):
        G.i2s_to_t2(bytes(bad), (2, 128))
    # bitnet.cpp's scale is max|W|: 0 means an all-zero weight, which is zero codes under any positive scale
    zero = bytearray(raw)
    zero[64:68] = struct.pack("<f", 0.0)
    t2z, sz = G.i2s_to_t2(bytes(zero), (2, 128))
    assert sz == 1.0 and np.all(t2_to_codes(t2z, 128) == 0)


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_tq_codecs_match_gguf_quants(qtype):
    """gguf.quants is the oracle: its bytes for d·t equal ours, and its dequant equals d·t from our decode."""
    enc, dec = {Q.TQ2_0: (G.t2_to_tq2_0, G.tq2_0_to_t2), Q.TQ1_0: (G.t2_to_tq1_0, G.tq1_0_to_t2)}[qtype]
    shape = (6, 768)
    t = random_ternary(*shape)
    t[:, ::256] = 1  # a nonzero in every block, so gguf's d = absmax = our d
    d = (RNG.integers(1, 200, size=shape[0] * 3) / 256).astype(np.float16)  # f16-exact block scales
    w = (d.astype(np.float32).repeat(256).reshape(shape) * t).astype(np.float32)
    ref = quants.quantize(w, qtype)
    ours = enc(codes_to_t2(t), shape, d)
    assert ours == ref.tobytes()
    t2, d_back = dec(ref, shape)
    assert np.array_equal(t2, codes_to_t2(t))
    assert d_back.dtype == np.float16 and np.array_equal(d_back, d)
    deq = quants.dequantize(ref, qtype)
    assert np.array_equal(deq, d_back.astype(np.float32).repeat(256).reshape(shape) * t2_to_codes(t2, shape[1]))


@pytest.mark.parametrize("qtype", [Q.TQ2_0, Q.TQ1_0])
def test_tq_round_trip_random(qtype):
    enc, dec = {Q.TQ2_0: (G.t2_to_tq2_0, G.tq2_0_to_t2), Q.TQ1_0: (G.t2_to_tq1_0, G.tq1_0_to_t2)}[qtype]
    shape = (5, 512)
    t2 = codes_to_t2(random_ternary(*shape))
    raw = enc(t2, shape, 0.25)
    back, d = dec(raw, shape)
    assert np.array_equal(back, t2) and np.all(d == np.float16(0.25))
    assert G.block_scales_to_tensor_scale(d) == 0.25
    if qtype == Q.TQ2_0:  # a 2-bit field holding 3 is no ternary code
        bad = bytearray(raw)
        bad[0] |= 0b11
        with pytest.raises(G.GGUFFormatError, match="code 3"):
            dec(bytes(bad), shape)


def test_tq_scale_must_be_f16_exact_unless_told():
    t2 = codes_to_t2(random_ternary(1, 256))
    with pytest.raises(G.GGUFFormatError, match="not representable in f16"):
        G.t2_to_tq2_0(t2, (1, 256), 0.1)
    raw = G.t2_to_tq2_0(t2, (1, 256), 0.1, exact=False)
    assert G.tq2_0_to_t2(raw, (1, 256))[1][0] == np.float16(0.1)
    with pytest.raises(G.GGUFFormatError, match="multiple of 256"):
        G.t2_to_tq1_0(codes_to_t2(random_ternary(1, 128)), (1, 128), 0.5)


def test_block_scales_and_folding():
    assert G.block_scales_to_tensor_scale(np.array([0.5, 0.5, 0, 0.5], np.float16)) == 0.5
    assert G.block_scales_to_tensor_scale(np.array([0.5, 0.25], np.float16)) is None
    assert G.block_scales_to_tensor_scale(np.zeros(3, np.float16)) is None
    shape = (3, 512)
    t2 = codes_to_t2(random_ternary(*shape))
    # per-row scales (2 blocks per row), one dead block whose codes must become zero
    d = np.array([0.5, 0.5, 0.25, 0.0, 1.0, 1.0], np.float16)
    folded, scale = G.fold_block_scales(t2, d, shape)
    assert scale.tolist() == [0.5, 0.25, 1.0]
    t = t2_to_codes(folded, 512)
    assert np.all(t[1, 256:] == 0) and np.array_equal(t[1, :256], t2_to_codes(t2, 512)[1, :256])
    deq = d.astype(np.float32).repeat(256).reshape(shape) * t2_to_codes(t2, 512)
    assert np.array_equal(scale[:, None] * t, deq)  # d·t == scale·t exactly
    with pytest.raises(G.GGUFFormatError, match="vary within row 0"):
        G.fold_block_scales(t2, np.array([0.5, 0.25, 1, 1, 1, 1], np.float16), shape)


def test_codecs_refuse_bad_arguments():
    """Every encoder and decoder names what is wrong with its arguments, instead of writing or reading garbage."""
    t = random_ternary(2, 256)
    t2, code3 = codes_to_t2(t), codes_to_t2(t)
    code3[1, 7] |= 0b11 << 4
    tq2, tq1 = G.t2_to_tq2_0(t2, (2, 256), 0.5), G.t2_to_tq1_0(t2, (2, 256), 0.5)
    cases = [
        (lambda: G.t2_to_i2s(t2, (2, 0), 1.0), r"2-D shape \(out, in\) with positive dims"),
        (lambda: G.t2_to_i2s(t2, (2, 256, 1), 1.0), r"2-D shape"),
        (lambda: G.t2_to_i2s(t2[:, :-1], (2, 256), 1.0), r"t2 data has 126 bytes, shape \(2, 256\) needs 128"),
        (lambda: G.t2_to_i2s(t2.astype(np.int16), (2, 256), 1.0), r"expected uint8 data, got int16"),
        (lambda: G.t2_to_i2s(code3, (2, 256), 1.0), r"I2_S: code 3 found in the t2 weights"),
        (lambda: G.t2_to_tq2_0(code3, (2, 256), 0.5), r"TQ2_0: code 3 found in the t2 weights"),
        (lambda: G.t2_to_tq1_0(code3, (2, 256), 0.5), r"TQ1_0: code 3 found in the t2 weights"),
        (lambda: G.tq2_0_to_t2(tq2[:-1], (2, 256)), r"TQ2_0: payload has 131 bytes, shape \(2, 256\) needs 132"),
        (lambda: G.tq1_0_to_t2(tq1 + b"\0", (2, 256)), r"TQ1_0: payload has 109 bytes, shape \(2, 256\) needs 108"),
        (lambda: G.t2_to_tq2_0(t2, (2, 256), [0.5, 0.5, 0.5]), r"3 block scales given, 2 blocks"),
        (lambda: G.t2_to_tq2_0(t2, (2, 256), [0.5, -0.5]), r"negative, or overflows or is not finite in f16"),
        (lambda: G.t2_to_tq1_0(t2, (2, 256), 1e6, exact=False), r"overflows or is not finite in f16"),
        (lambda: G.fold_block_scales(t2, np.full(3, 0.5, np.float16), (2, 256)), r"3 block scales for 2 blocks"),
        (lambda: G.fold_block_scales(t2, np.array([0.5, np.nan], np.float16), (2, 256)), r"negative or not finite"),
        (lambda: G.float_to_t2(np.ones(4, np.float32)), r"a ternary weight is 2-D, got shape \(4,\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(G.GGUFFormatError, match=pattern):
            call()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(G.GGUFFormatError, match=r"I2_S: scale .* is not finite and > 0"):
            G.t2_to_i2s(t2, (2, 256), bad)


# ------------------------------------------------------------------------------------------------
# tiny GGUF models written with gguf.GGUFWriter

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # gguf suffix -> (canonical, shape)
    "attn_q": ("attn.q_proj", (HEADS * HEAD_DIM, HIDDEN)),
    "attn_k": ("attn.k_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_v": ("attn.v_proj", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "attn_output": ("attn.o_proj", (HIDDEN, HEADS * HEAD_DIM)),
    "ffn_gate": ("mlp.gate_proj", (INTER, HIDDEN)),
    "ffn_up": ("mlp.up_proj", (INTER, HIDDEN)),
    "ffn_down": ("mlp.down_proj", (HIDDEN, INTER)),
}
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "BitNet b1.58 stores every weight as -1, 0 or +1 with one scale per tensor.",
    "Ternary weights take two bits each; 1234 tokens per second is a fine speed!",
    "   Spaces,\ttabs and\nnew lines   should survive the round trip.",
    "Don't they'll we've it's I'm you'd -- quotes \"and\" (brackets) [too].",
] * 20
PROBES = [
    "The quick brown fox",
    "Ternary weights: -1, 0, +1!",
    "  leading spaces and\nnewlines\t",
    "unseen wordz like Zyxwv and émojis 🚀",
    "<|bos|> inline special <|eos|>",
    "they'll it's 12345",
]


# Meta-Llama-3's tokenizer.json pre-tokenizer split, copied here so the test does not trust the module's copy
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_bpe(llama3_split: bool):
    """A byte-level BPE tokenizer trained here; specials <|bos|> <|eos|> <|eot_id|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if llama3_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|eot_id|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if llama3_split:
        tok.model.ignore_merges = True  # as in Llama-3's tokenizer.json (and llama.cpp's llama-bpe)
    return tok


def gpt2_vocab_kv(tok) -> dict:
    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab()
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    types = [3 if s in ("<|bos|>", "<|eos|>", "<|eot_id|>") else 1 for s in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges,
            "bos": vocab["<|bos|>"], "eos": vocab["<|eos|>"]}


def quantized_rows(arr: np.ndarray, qtype) -> np.ndarray:
    """``arr`` [rows, cols] as ggml ``qtype`` bytes [rows, row bytes]: gguf's quantizer where it has one, else
    random blocks with small finite f16 scales (gguf-py dequantizes the K-quants but cannot quantize them)."""
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        return quants.quantize(arr.astype(np.float32), qtype)
    block, per = gguf.GGML_QUANT_SIZES[qtype]
    raw = RNG.integers(0, 256, size=(arr.shape[0], arr.shape[1] // block, per), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    scale_at = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (per - 2,)}[qtype]  # d (and dmin) byte offsets
    for at in scale_at:
        raw[..., at : at + 2] = half
    return raw.reshape(arr.shape[0], -1)


def write_model(path: Path, *, arch="bitnet-b1.58", qtype="i2_s", tok_kv=None, tied=True, sub_norms=True,
                extra_scales=False, pre=None, add_bos=None, chat_template=None, row_scales=False,
                vocab_override=None, embed_qtype=None, rope_dims=None, freq_base=500000.0, drop=(), rope_scaling=None):
    """A tiny BitNet GGUF; returns {canonical name: (t int8, scale array)} and {canonical float name: array}.
    ``embed_qtype``: token_embd (and an untied output, in Q6_K) quantized as llama-quantize writes them; their
    arrays are then gguf.quants.dequantize's f32 values. ``drop``: float tensors (GGUF names) left out. ``sub_norms``:
    True, False, or the layers that have them. ``rope_scaling``: (type, factor) of rope.scaling. ``extra_scales`` (arch
    bitnet): upstream's blk.N.*.scale multipliers, random (True) or the given array."""
    w = gguf.GGUFWriter(str(path), arch)
    a = arch
    tok_kv = tok_kv or gpt2_vocab_kv(train_bpe(False))
    vocab = vocab_override or len(tok_kv["tokens"])
    w.add_uint32(f"{a}.block_count", LAYERS)
    w.add_uint32(f"{a}.context_length", 512)
    w.add_uint32(f"{a}.embedding_length", HIDDEN)
    w.add_uint32(f"{a}.feed_forward_length", INTER)
    w.add_uint32(f"{a}.attention.head_count", HEADS)
    w.add_uint32(f"{a}.attention.head_count_kv", KV_HEADS)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    if freq_base is not None:
        w.add_float32(f"{a}.rope.freq_base", freq_base)
    if rope_dims is not None:
        w.add_rope_dimension_count(rope_dims)
    if rope_scaling is not None:  # (type or None, factor[, the factor's key])
        if rope_scaling[0] is not None:
            w.add_string(f"{a}.rope.scaling.type", rope_scaling[0])
        w.add_float32(f"{a}.{rope_scaling[2] if len(rope_scaling) > 2 else 'rope.scaling.factor'}", rope_scaling[1])
    w.add_uint32(f"{a}.vocab_size", vocab)
    w.add_tokenizer_model(tok_kv.get("model", "gpt2"))
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tok_kv["tokens"])
    w.add_token_types(tok_kv["types"])
    if "merges" in tok_kv:
        w.add_token_merges(tok_kv["merges"])
    if "scores" in tok_kv:
        w.add_token_scores(tok_kv["scores"])
    if tok_kv.get("bos") is not None:
        w.add_bos_token_id(tok_kv["bos"])
    if tok_kv.get("eos") is not None:
        w.add_eos_token_id(tok_kv["eos"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    ternary, floats = {}, {}

    def add_float(gname, canon, arr, dtype=np.float32):
        if gname in drop:  # a file that lacks it
            return
        arr = arr.astype(dtype)
        w.add_tensor(gname, arr)
        floats[canon] = arr

    def add_vocab_matrix(gname, canon, qt):
        arr = RNG.standard_normal((vocab, HIDDEN))
        if qt is None:
            return add_float(gname, canon, arr, np.float16)
        raw = quantized_rows(arr, qt)
        w.add_tensor(gname, raw, raw_dtype=qt)
        floats[canon] = quants.dequantize(raw, qt)

    add_vocab_matrix("token_embd.weight", "embed.weight", embed_qtype)
    for i in range(LAYERS):
        add_float(f"blk.{i}.attn_norm.weight", f"layers.{i}.attn_norm.weight", RNG.random(HIDDEN) + 0.5)
        add_float(f"blk.{i}.ffn_norm.weight", f"layers.{i}.mlp_norm.weight", RNG.random(HIDDEN) + 0.5)
        if sub_norms is True or sub_norms and i in sub_norms:  # or the layers that have them
            add_float(f"blk.{i}.attn_sub_norm.weight", f"layers.{i}.attn.sub_norm.weight", RNG.random(HIDDEN) + 0.5)
            add_float(f"blk.{i}.ffn_sub_norm.weight", f"layers.{i}.mlp.sub_norm.weight", RNG.random(INTER) + 0.5)
        for suffix, (canon, shape) in LINEARS.items():
            t = random_ternary(*shape)
            t[:, ::256] = 1
            name = f"blk.{i}.{suffix}.weight"
            cname = f"layers.{i}.{canon}.weight"
            if qtype == "i2_s":
                s = np.float32(RNG.uniform(0.01, 0.1))
                raw = np.frombuffer(G.t2_to_i2s(codes_to_t2(t), shape, s), np.uint8)
                # REFERENCE §6: GGUFWriter takes an unknown type only with a non-uint8 view + raw_dtype
                w.add_tensor(name, raw.view(np.float32), raw_shape=shape, raw_dtype=36)
                scale = np.array([s], np.float32)
            elif qtype == "q8_0":  # not a ternary layout: the source refuses it
                scale = np.array([0.5], np.float32)
                w.add_tensor(name, quants.quantize(scale[0] * t.astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
            elif qtype == "f16":  # upstream's unquantized export: the values c·t themselves
                scale = np.array([np.float16(RNG.uniform(0.01, 0.1))], np.float32)
                w.add_tensor(name, (scale[0] * t).astype(np.float16))
            else:
                if row_scales:
                    scale = (RNG.integers(1, 64, size=shape[0]) / 512).astype(np.float32)
                else:
                    scale = np.array([RNG.integers(1, 64) / 512], np.float32)  # f16-exact
                wf = (np.broadcast_to(scale[:, None] if row_scales else scale, (shape[0], 1)) * t).astype(np.float32)
                gq = Q.TQ2_0 if qtype == "tq2_0" else Q.TQ1_0
                w.add_tensor(name, quants.quantize(wf, gq), raw_dtype=gq)
            if extra_scales is not False:  # True: random multipliers; an array: that one for every linear
                e = np.array([RNG.uniform(0.5, 2.0)], np.float32) if extra_scales is True else extra_scales
                w.add_tensor(f"blk.{i}.{suffix}.scale", e)
                scale = (scale * e[0]).astype(np.float32)
            ternary[cname] = (t, scale)
    add_float("output_norm.weight", "norm.weight", RNG.random(HIDDEN) + 0.5)
    if not tied:
        add_vocab_matrix("output.weight", "lm_head.weight", None if embed_qtype is None else Q.Q6_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ternary, floats


@pytest.mark.parametrize("qtype", ["i2_s", "tq2_0", "tq1_0"])
def test_source_2b4t_weights_and_config(tmp_path, qtype):
    path = tmp_path / "m.gguf"
    ternary, floats = write_model(path, qtype=qtype)
    with G.GGUFSource(path) as src:
        c = src.config
        assert c["family"] == "bitnet" and c["hidden_act"] == "relu2" and c["sub_norms"] is True
        assert c["tie_word_embeddings"] is True and "lm_head.weight" not in src.tensors
        assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, INTER, LAYERS)
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
        assert c["vocab_size"] == floats["embed.weight"].shape[0] and c["max_position_embeddings"] == 512
        assert c["rope_theta"] == 500000.0 and c["rope_style"] == "neox" and c["rope_scaling"] is None
        assert c["rms_norm_eps"] == pytest.approx(1e-5) and c["bos_token_id"] == 0
        assert set(c) == {"family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                          "rope_style", "rope_scaling", "rms_norm_eps", "hidden_act", "sub_norms",
                          "tie_word_embeddings", "bos_token_id", "eos_token_id"}
        assert set(src.tensors) == set(ternary) | set(floats)
        for name, (t, scale) in ternary.items():
            info = src.tensors[name]
            assert info.dtype == "t2" and info.shape == t.shape
            packed, s = src.ternary(name)
            assert packed.dtype == torch.uint8 and s.dtype == torch.float32
            assert np.array_equal(packed.numpy(), codes_to_t2(t)), name
            assert np.array_equal(s.numpy(), scale), name
        for name, arr in floats.items():
            v = src.torch(name)
            assert tuple(v.shape) == arr.shape and np.array_equal(v.numpy(), arr)
            assert src.tensors[name].dtype == {np.float16: "f16", np.float32: "f32"}[arr.dtype.type]
        with pytest.raises(G.GGUFFormatError, match="ternary"):
            src.torch("layers.0.attn.q_proj.weight")


def test_source_tq_row_scales_and_dequant_oracle(tmp_path):
    """Per-row TQ scales become a [out] scale; scale·t equals gguf.quants.dequantize of the stored tensor."""
    path = tmp_path / "m.gguf"
    ternary, _ = write_model(path, qtype="tq2_0", row_scales=True, arch="bitnet")
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}  # upstream's reader handles TQ2_0
    with G.GGUFSource(path) as src:
        for name, (t, scale) in ternary.items():
            packed, s = src.ternary(name)
            assert s.shape == (t.shape[0],) and np.array_equal(s.numpy(), scale)
            gname = src.tensors[name].gguf_name
            deq = quants.dequantize(np.asarray(reader[gname].data), Q.TQ2_0).reshape(t.shape)
            ours = s.numpy()[:, None] * t2_to_codes(packed.numpy(), t.shape[1])
            assert np.array_equal(deq, ours)


def test_source_upstream_bitnet_arch(tmp_path):
    """arch `bitnet`: SiLU, 1bitLLM family, *.scale tensors multiply, an untied output head is honoured."""
    path = tmp_path / "m.gguf"
    ternary, floats = write_model(path, arch="bitnet", qtype="tq1_0", extra_scales=True, tied=False)
    with G.GGUFSource(path) as src:
        assert src.config["hidden_act"] == "silu" and src.config["family"] == "1bitllm"
        assert src.config["tie_word_embeddings"] is False
        assert np.array_equal(src.torch("lm_head.weight").numpy(), floats["lm_head.weight"])
        for name, (t, scale) in ternary.items():
            packed, s = src.ternary(name)
            assert np.array_equal(s.numpy(), scale) and np.array_equal(packed.numpy(), codes_to_t2(t))


def test_source_refuses_bad_scale_multipliers(tmp_path):
    """An upstream blk.N.*.scale multiplier must be one finite f32 > 0: another type or shape is refused when the
    file opens, a bad value when its tensor is read."""
    path = tmp_path / "m.gguf"
    for e, message in (
        (np.array([1.0, 2.0], np.float32), r"tensor 'blk\.0\.\w+\.scale' must be F32 \[1\], got F32 \(2,\)"),
        (np.array([1.0], np.float16), r"tensor 'blk\.0\.\w+\.scale' must be F32 \[1\], got F16 \(1,\)"),
    ):
        write_model(path, arch="bitnet", qtype="tq2_0", extra_scales=e)
        with pytest.raises(G.GGUFFormatError, match=message):
            G.GGUFSource(path)
    for value in (0.0, -1.0, np.inf, np.nan):
        write_model(path, arch="bitnet", qtype="tq2_0", extra_scales=np.array([value], np.float32))
        with G.GGUFSource(path) as src, pytest.raises(G.GGUFFormatError, match=(
                rf"tensor 'blk\.0\.attn_q\.scale': multiplier {value} is not finite and > 0")):
            src.ternary("layers.0.attn.q_proj.weight")


def test_rope_freq_base_defaults_as_llama_cpp(tmp_path):
    """A file without rope.freq_base runs at llama.cpp's default base, 10000 (load_hparams sets it before the optional
    key), whatever the arch: not at the 2B-4T's 500000."""
    for arch in ("bitnet-b1.58", "bitnet"):
        path = tmp_path / f"{arch}.gguf"
        write_model(path, arch=arch, qtype="tq2_0", freq_base=None)
        with G.GGUFSource(path) as src:
            assert src.config["rope_theta"] == 10000.0


def test_rope_scaling_linear_is_read_and_others_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, rope_scaling=("linear", 2.0))
    with G.GGUFSource(path) as src:
        assert src.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    write_model(path, rope_scaling=("yarn", 4.0))
    with pytest.raises(G.GGUFFormatError, match="unsupported rope scaling type 'yarn'"):
        G.GGUFSource(path)
    # as llama.cpp reads them: no type is linear, and the factor may stand under the old key rope.scale_linear
    for scaling in ((None, 4.0), ("linear", 4.0, "rope.scale_linear"), (None, 4.0, "rope.scale_linear")):
        write_model(path, rope_scaling=scaling)
        with G.GGUFSource(path) as src:
            assert src.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}, scaling
    write_model(path, rope_scaling=("none", 4.0))
    with G.GGUFSource(path) as src:
        assert src.config["rope_scaling"] is None
    write_model(path, rope_scaling=("linear", 0.0))  # llama.cpp: a factor of 0 is no scaling
    with G.GGUFSource(path) as src:
        assert src.config["rope_scaling"] is None
    write_model(path, rope_scaling=("linear", -2.0))
    with pytest.raises(G.GGUFFormatError, match="rope.scaling.factor' = -2.0 must be a positive number"):
        G.GGUFSource(path)


def test_lying_block_count_is_refused_at_once(tmp_path):
    # block_count sizes per-layer loops: 2^31 - 1 layers made opening the file hang (and fill memory); 100,000
    # would have opened to a misleading error about sub-norms
    path = tmp_path / "m.gguf"
    write_model(path)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"bitnet-b1.58.block_count") + len(b"bitnet-b1.58.block_count")
    assert struct.unpack_from("<II", raw, at) == (4, LAYERS)  # a UINT32 value
    struct.pack_into("<I", raw, at + 4, 100_000)
    path.write_bytes(raw)
    with pytest.raises(G.GGUFFormatError, match=r"block_count = 100000, but the file holds only \d+ tensors"):
        G.GGUFSource(path)


def test_partial_rotary_embeddings_are_refused(tmp_path):
    # rope.dimension_count below the head size rotates only part of each head in llama.cpp: another model
    path = tmp_path / "m.gguf"
    write_model(path, rope_dims=HEAD_DIM)
    with G.GGUFSource(path) as src:
        assert src.config["head_dim"] == HEAD_DIM
    write_model(path, rope_dims=HEAD_DIM // 2)
    with pytest.raises(G.GGUFFormatError, match=f"rope.dimension_count = {HEAD_DIM // 2}, but heads have {HEAD_DIM} "
                                                "dims: partial rotary embeddings are not supported"):
        G.GGUFSource(path)


def test_source_activation_override_and_bad_arch(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    with G.GGUFSource(path, activation="silu") as src:
        assert src.config["hidden_act"] == "silu" and src.config["family"] == "1bitllm"
    with pytest.raises(G.GGUFFormatError, match="activation"):
        G.GGUFSource(path, activation="gelu")
    other = tmp_path / "llama.gguf"
    write_model(other, arch="llama")
    with pytest.raises(G.GGUFFormatError, match="unsupported architecture 'llama'"):
        G.GGUFSource(other)
    nosub = tmp_path / "nosub.gguf"
    write_model(nosub, sub_norms=False)
    with pytest.raises(G.GGUFFormatError, match="sub_norm"):
        G.GGUFSource(nosub)
    nosub_up = tmp_path / "nosub_up.gguf"
    write_model(nosub_up, arch="bitnet", sub_norms=False, qtype="tq2_0")
    with G.GGUFSource(nosub_up) as src:
        assert src.config["sub_norms"] is False and src.config["family"] == "llama-bitnet"


# ------------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("llama3", [False, True])
def test_gpt2_tokenizer_matches_source(tmp_path, llama3):
    from tokenizers import Tokenizer

    src_tok = train_bpe(llama3)
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=gpt2_vocab_kv(src_tok), pre="llama-bpe" if llama3 else "gpt-2",
                chat_template="{{ messages[0]['content'] }}")
    with G.GGUFSource(path) as src:
        td = src.tokenizer
        tok = Tokenizer.from_str(td["tokenizer_json"])
        for text in PROBES:
            want = src_tok.encode(text, add_special_tokens=False).ids
            assert tok.encode(text, add_special_tokens=False).ids == want, text
            assert tok.decode(want, skip_special_tokens=False) == src_tok.decode(want, skip_special_tokens=False)
        bos = src_tok.token_to_id("<|bos|>")
        assert tok.encode("<|eot_id|>", add_special_tokens=False).ids == [src_tok.token_to_id("<|eot_id|>")]
        assert td["bos_token"] == "<|bos|>" and td["eos_token"] == "<|eos|>"
        assert td["add_bos_token"] is llama3 and td["add_eos_token"] is False
        assert (tok.encode("hi").ids[0] == bos) is llama3
        assert td["chat_template"] == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("pre", ["default", None])
def test_default_split_without_a_pre_name(tmp_path, pre):
    # "default", or no tokenizer.ggml.pre outside Microsoft's Llama-3 vocabulary: llama.cpp's four default regexes,
    # each splitting what the one before left (punctuation alone, "'s" then split at its "'", digits by threes)
    from tokenizers import Tokenizer

    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=gpt2_vocab_kv(train_bpe(False)), pre=pre)
    with G.GGUFSource(path) as src:
        tok = Tokenizer.from_str(src.tokenizer["tokenizer_json"])
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("It's 12345 ok?! a+b")]
    assert pieces == ["It", "'", "s", "Ġ", "123", "45", "Ġok", "?!", "Ġa", "+", "b"]


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "default", None])
def test_gguf_tokenizer_splits_as_llama_cpp(tmp_path, pre):
    # our reader against llama.cpp itself (llama-cpp-python's tokenizer, vocab only) on one GGUF per pre name,
    # with a vocabulary whose merges cross the splits' boundaries (the demo model's, trained on English text)
    import random

    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    src_tok = Tokenizer.from_file(str(Path(__file__).parents[1] / "examples" / "tiny-bitnet" / "tokenizer.json"))
    vocab = src_tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(src_tok.to_str())["model"]["merges"]
    kv = {"tokens": tokens, "types": [3 if t.startswith("<|") and t.endswith("|>") else 1 for t in tokens],
          "merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
          "bos": vocab["<|begin_of_text|>"], "eos": vocab["<|end_of_text|>"]}  # fmt: skip
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=kv, pre=pre, arch="bitnet", qtype="tq2_0")  # an architecture upstream llama.cpp has
    with G.GGUFSource(path) as src:
        ours = Tokenizer.from_str(src.tokenizer["tokenizer_json"])
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    rng = random.Random(0)
    chars = "ab cd'.,!?$+<=>^~|0123456789\n\t ÜΩ—🙂'sllTHE"
    texts = PROBES + ["It's 2024... price: 12345 dollars, ok?! $5+3=8 <tag> don't we'll I'm"]
    texts += ["".join(rng.choice(chars) for _ in range(120)) for _ in range(50)]
    for text in texts:
        want = theirs.tokenize(text.encode(), add_bos=False, special=False)
        assert ours.encode(text, add_special_tokens=False).ids == want, text


def test_unused_tokens_decode_to_nothing_as_in_llama_cpp(tmp_path):
    # UNUSED rows (llama-quantize's padding, our [PADn]) are no text: llama.cpp decodes them to nothing, and text
    # that spells one is not that id
    llama_cpp = pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    kv = gpt2_vocab_kv(train_bpe(False))
    n = len(kv["tokens"])
    kv["tokens"] += ["[PAD0]", "[PAD1]"]
    kv["types"] += [5, 5]
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=kv, arch="bitnet", qtype="tq2_0")
    with G.GGUFSource(path) as src:
        ours = Tokenizer.from_str(src.tokenizer["tokenizer_json"])
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    the = ours.encode("the", add_special_tokens=False).ids
    ids = [n, *the, n + 1]
    assert ours.decode(ids) == theirs.detokenize(ids).decode() == "the"
    assert n not in ours.encode("[PAD0]", add_special_tokens=False).ids
    assert ours.encode("[PAD0]", add_special_tokens=False).ids == theirs.tokenize(b"[PAD0]", add_bos=False)


def test_gguf_stop_ids_are_llama_cpps(tmp_path):
    # a generation ends where llama.cpp's does: on the eos/eot/eom keys, and on every token whose text llama.cpp
    # knows as an end of generation, keyed or not (the trained vocabulary has <|eot_id|>, a text of that list)
    llama_cpp = pytest.importorskip("llama_cpp")
    kv = gpt2_vocab_kv(train_bpe(False))
    n = len(kv["tokens"])
    texts = [t for t in G.LLAMA_CPP_EOG_TEXTS if t != "<|eot_id|>"]
    for drop, kept in (((), 17), (("<|return|>", "<|flush|>"), 16), (("<|tool_response>",), 17)):
        # with all of them, llama.cpp drops <|end|> (gpt-oss's <|return|>, <|call|>) and </s> (<|tool_response>)
        kv = gpt2_vocab_kv(train_bpe(False))
        n = len(kv["tokens"])
        # in reverse: the stop ids come in the list's order (<|eot_id|> before <|eom_id|>), not by id
        kv["tokens"] += [t for t in reversed(texts) if t not in drop] + ["<|start|>", "<|user|>", "<s>"]  # 3 non-stops
        kv["tokens"] += ["<|fim_prefix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<file_sep>"]  # 3 FIM stops
        kv["types"] += [3] * (len(kv["tokens"]) - n)
        path = tmp_path / f"m{kept}{len(drop)}.gguf"
        write_model(path, tok_kv=kv, arch="bitnet", qtype="tq2_0")
        with G.GGUFSource(path) as src:
            ours = src.config["eos_token_id"]
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)  # kept: the vocab is its memory
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        theirs = [i for i in range(len(kv["tokens"])) if llama_cpp.llama_vocab_is_eog(vocab, i)]
        assert ours[0] == kv["eos"] and sorted(ours) == theirs and len(theirs) == kept + 2 + 3, drop
        listed = [i for i in ours[1:] if kv["tokens"][i] in G.LLAMA_CPP_EOG_TEXTS]
        assert listed == sorted(listed, key=lambda i: G.LLAMA_CPP_EOG_TEXTS.index(kv["tokens"][i]))


def test_no_2b4t_template_for_another_vocabulary(tmp_path):
    # the 2B-4T chat template stands in for Microsoft's missing one only where the vocabulary is that file's
    # (Llama-3's 128256 tokens): another relu² model without a template has none, as it had before its export
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=gpt2_vocab_kv(train_bpe(True)))
    with G.GGUFSource(path) as src:
        assert "<|eot_id|>" in src.metadata["tokenizer.ggml.tokens"] and src.tokenizer["chat_template"] is None


def test_2b4t_defaults_without_pre_or_template(tmp_path):
    """Microsoft's file: no tokenizer.ggml.pre, no chat template, a 128256-token Llama-3 vocab."""
    from tokenizers import Tokenizer

    src_tok = train_bpe(True)
    kv = gpt2_vocab_kv(src_tok)
    n0 = len(kv["tokens"])
    # pad to Llama-3's size with reserved specials, and name bos like Llama-3
    kv["tokens"] = kv["tokens"] + [f"<|reserved_special_token_{i}|>" for i in range(G.LLAMA3_VOCAB_SIZE - n0 - 1)]
    kv["tokens"].append("<|begin_of_text|>")
    kv["tokens"][n0] = "<|eom_id|>"  # a stop by its text alone
    kv["types"] = kv["types"] + [3] * (G.LLAMA3_VOCAB_SIZE - n0)
    kv["bos"] = G.LLAMA3_VOCAB_SIZE - 1
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=kv)
    with G.GGUFSource(path) as src:
        td = src.tokenizer
        assert td["chat_template"] == G.BITNET_2B4T_CHAT_TEMPLATE
        eot = kv["tokens"].index("<|eot_id|>")
        assert src.config["eos_token_id"] == [kv["eos"], eot, n0]  # llama.cpp's stops; eot before eom
        tok = Tokenizer.from_str(td["tokenizer_json"])
        for text in PROBES:
            assert tok.encode(text, add_special_tokens=False).ids == src_tok.encode(text, add_special_tokens=False).ids
        assert td["add_bos_token"] is True and tok.encode("hi").ids[0] == kv["bos"]
        import jinja2

        rendered = jinja2.Template(td["chat_template"]).render(
            messages=[{"role": "user", "content": "Hello"}], bos_token=td["bos_token"], add_generation_prompt=True)
        assert rendered == "User: Hello<|eot_id|>Assistant: "  # REFERENCE §6; BOS comes from the post-processor


@pytest.mark.parametrize("which", [0, 1, "merged"])
def test_merge_outside_the_vocabulary_is_one_clear_error(tmp_path, which):
    # a merge whose part (or whose result) is no token: tokenizers' BPE would raise a bare Exception
    kv = gpt2_vocab_kv(train_bpe(False))
    a, b = kv["merges"][5].split(" ")
    kv["tokens"][kv["tokens"].index(a + b if which == "merged" else (a, b)[which])] = "\u2603never"
    path = tmp_path / "m.gguf"
    write_model(path, tok_kv=kv)
    with G.GGUFSource(path) as src, pytest.raises(G.GGUFFormatError, match=r"merges\[\d+\] .* not in the vocabulary"):
        src.tokenizer


def test_llama_sentencepiece_tokenizer_matches_sentencepiece(tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer

    model_prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(model_prefix), vocab_size=500, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<special>"], minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False)  # as LLaMA's tokenizer.model
    sp = spm.SentencePieceProcessor(model_file=str(model_prefix) + ".model")
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    types = []
    for i in range(n):
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 4 if tokens[i] == "<special>" else 5 if sp.is_unused(i) else 1)
    kv = {"model": "llama", "tokens": tokens, "types": types, "scores": scores, "bos": 1, "eos": 2}
    path = tmp_path / "m.gguf"
    write_model(path, arch="bitnet", qtype="tq2_0", tok_kv=kv)
    with G.GGUFSource(path) as src:
        td = src.tokenizer
        tok = Tokenizer.from_str(td["tokenizer_json"])
        for text in PROBES[:4] + ["Hello world", "a  b", " x"]:
            want = sp.encode(text)
            got = tok.encode(text, add_special_tokens=False).ids
            assert got == want, text
            assert tok.decode(got) == sp.decode(want), text
        # like llama.cpp (and HF's legacy Llama tokenizer), the text after an added token gets its own "▁" prefix
        special = tokens.index("<special>")
        assert tok.encode("x<special>y", add_special_tokens=False).ids == sp.encode("x") + [special] + sp.encode("y")
        assert td["add_bos_token"] is True and tok.encode("Hello").ids[0] == 1
        assert tok.encode("<special>", add_special_tokens=False).ids == [tokens.index("<special>")]
    # without bos/eos ids: llama.cpp's SentencePiece ids, <s> 1 and </s> 2 (the file was refused)
    write_model(path, arch="bitnet", qtype="tq2_0", tok_kv={**kv, "bos": None, "eos": None})
    with G.GGUFSource(path) as src:
        assert (src.config["bos_token_id"], src.config["eos_token_id"]) == (1, [2])
        assert (src.tokenizer["bos_token"], src.tokenizer["eos_token"]) == ("<s>", "</s>")
        assert Tokenizer.from_str(src.tokenizer["tokenizer_json"]).encode("Hello").ids[0] == 1


def test_spm_merges_leave_out_tokens_longer_than_a_sentencepiece_piece(caplog):
    """Splitting a token costs its length squared (one 400k-character token took minutes to read): a token longer
    than SentencePiece's longest learned piece (512 characters) gets no merges, with a warning; the others keep theirs,
    in the same order."""
    tokens = ["a", "b", "ab", "a" * 256, "a" * 512, "a" * 513, "é" * 5000]
    scores = -np.arange(len(tokens), dtype=np.float32)
    with caplog.at_level("WARNING", logger=G.__name__):
        merges = G._spm_merges(tokens, scores)
    assert merges == [("a", "b"), ("a" * 256, "a" * 256)]  # "a" * 513 = "a" + "a" * 512 is not a merge
    assert "2 tokens are longer than 512 characters" in caplog.text


# ------------------------------------------------------------------------------------------------
# hostile files: a serializer written here so each field can be made to lie


def gguf_bytes(*, version=3, kvs=(), tensors=(), alignment=32, n_tensors=None, n_kv=None, magic=b"GGUF"):
    """kvs: (key, vtype, payload bytes); tensors: (name, dims (ggml order), type, rel offset, data bytes)."""

    def s(x: str | bytes) -> bytes:
        b = x.encode() if isinstance(x, str) else x
        return struct.pack("<Q", len(b)) + b

    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                        len(kvs) if n_kv is None else n_kv))
    for key, vtype, payload in kvs:
        out += s(key) + struct.pack("<I", vtype) + payload
    for name, dims, ttype, rel, _ in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ttype, rel)
    data_start = -(-len(out) // alignment) * alignment
    out += bytes(data_start - len(out))
    for _, _, _, rel, data in tensors:
        if not data:
            continue
        need = data_start + rel + len(data)
        if len(out) < need:
            out += bytes(need - len(out))
        out[data_start + rel : data_start + rel + len(data)] = data
    return bytes(out)


def str_kv(key, value):
    b = value.encode()
    return (key, 8, struct.pack("<Q", len(b)) + b)


F32_TENSOR = ("a", [8], 0, 0, np.arange(8, dtype=np.float32).tobytes())
F32_TENSOR_B = ("b", [8], 0, 32, np.ones(8, dtype=np.float32).tobytes())
GOOD = dict(kvs=[str_kv("general.architecture", "bitnet-b1.58")], tensors=[F32_TENSOR, F32_TENSOR_B])


def open_small(path: Path, data: bytes):
    """Open the bytes as a GGUF, asserting no big allocation happens on the way to the error."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        G.GGUFFile(path).close()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 << 20, f"opening allocated {peak} bytes"


def test_good_container_parses(tmp_path):
    for version in (2, 3):
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(gguf_bytes(version=version, **GOOD))
        with G.GGUFFile(path) as f:
            assert f.version == version and f.metadata == {"general.architecture": "bitnet-b1.58"}
            assert list(f.tensors) == ["a", "b"]
            assert f.float_tensor("a").tolist() == list(range(8))
            assert f.tensors["b"].offset == f.data_offset + 32


HUGE = 1 << 60
ARRAY_KV = ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + struct.pack("<Q", 1) + b"a"
            + struct.pack("<Q", 1) + b"b")


@pytest.mark.parametrize("case,data,match", [
    ("empty", b"", "truncated"),
    ("bad magic", gguf_bytes(magic=b"GGML", **GOOD), "not a GGUF file: magic b'GGML'"),
    ("a packed file", b"BN158PAK" + bytes(64), "not a GGUF file [(]a bitnet158 packed file[)]: magic b'BN15'"),
    ("big-endian", gguf_bytes(version=3 << 24, **GOOD), "big-endian GGUF file"),
    ("cut before the data", gguf_bytes(**GOOD)[:-65], "the data section would start at 160, file is 159 bytes"),
    ("version 1", gguf_bytes(version=1, **GOOD), "unsupported GGUF version 1"),
    ("version 4", gguf_bytes(version=4, **GOOD), "unsupported GGUF version 4"),
    ("truncated mid-table", gguf_bytes(**GOOD)[:60], "truncated|cannot fit"),
    ("truncated data", gguf_bytes(**GOOD)[:-4], "past the end"),
    ("lying n_tensors", gguf_bytes(n_tensors=HUGE, **GOOD), "n_tensors"),
    ("lying n_kv", gguf_bytes(n_kv=1 << 40, **GOOD), "n_kv"),
    ("n_kv one too many", gguf_bytes(n_kv=2, kvs=GOOD["kvs"]), "truncated|cannot fit|empty"),
    ("huge string length", gguf_bytes(kvs=[("k", 8, struct.pack("<Q", HUGE) + b"x" * 16)]), "truncated"),
    ("huge key length", gguf_bytes(kvs=[("k", 8, b"")])[:24] + struct.pack("<Q", HUGE) + bytes(64),
     "exceeds the limit"),
    ("huge array length", gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 4, HUGE) + bytes(16))]), "cannot fit"),
    ("huge string array", gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 8, 1 << 32) + bytes(16))]), "cannot fit"),
    ("huge string in array", gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 8, 1) + struct.pack("<Q", HUGE) + bytes(8))]),
     "truncated"),
    ("unknown value type", gguf_bytes(kvs=[("k", 77, b"\0" * 8)]), "unknown value type 77"),
    ("duplicate key", gguf_bytes(kvs=[str_kv("k", "a"), str_kv("k", "b")]), "duplicate metadata key 'k'"),
    ("offset past EOF", gguf_bytes(kvs=[], tensors=[("a", [8], 0, 1 << 40, b"")]), "past the end"),
    ("absurd dims", gguf_bytes(tensors=[("a", [1 << 30, 1 << 30, 1 << 30], 0, 0, b"")]), "too many elements"),
    ("zero dim", gguf_bytes(tensors=[("a", [0, 4], 0, 0, b"")]), "dims"),
    ("too many dims", gguf_bytes(tensors=[("a", [1, 1, 1, 1, 1], 0, 0, b"")]), "n_dims 5"),
    ("unknown type", gguf_bytes(tensors=[("w", [32, 2], 9, 0, bytes(72))]),
     "unsupported tensor type Q8_1 in tensor 'w'"),
    ("K-quant row", gguf_bytes(tensors=[("w", [128, 2], 12, 0, bytes(144))]), "Q4_K rows must be a multiple of 256"),
    ("unknown type id", gguf_bytes(tensors=[("w", [32, 2], 99, 0, bytes(68))]),
     "unsupported tensor type 99 in tensor 'w'"),
    ("misaligned data", gguf_bytes(tensors=[("a", [4], 0, 16, bytes(16))]), "not a multiple of the alignment"),
    ("duplicate names", gguf_bytes(tensors=[F32_TENSOR, ("a", [8], 0, 32, bytes(32))]), "duplicate tensor name 'a'"),
    ("empty name", gguf_bytes(tensors=[("", [8], 0, 0, bytes(32))]), "tensor 0 at offset 24 has an empty name"),
    ("overlap", gguf_bytes(tensors=[("a", [16], 0, 0, bytes(64)), ("b", [8], 0, 32, bytes(32))]), "overlap"),
    ("bad alignment", gguf_bytes(kvs=[("general.alignment", 4, struct.pack("<I", 24))], tensors=[F32_TENSOR]),
     "power of two"),
    ("I2_S row", gguf_bytes(tensors=[("w", [64, 2], 36, 0, bytes(64))]), "multiple of 128"),
    ("TQ row", gguf_bytes(tensors=[("w", [128, 2], 35, 0, bytes(66))]), "multiple of 256"),
    ("bad utf-8", gguf_bytes(kvs=[("k", 8, struct.pack("<Q", 2) + b"\xff\xfe")]), "invalid UTF-8"),
    ("deep arrays", gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 9, 1) * 6 + bytes(32))]), "nested deeper"),
])
def test_hostile_files_raise_one_clear_error(tmp_path, case, data, match):
    with pytest.raises(G.GGUFFormatError, match=match) as e:
        open_small(tmp_path / "x.gguf", data)
    assert str(e.value).startswith(f"{tmp_path / 'x.gguf'}: ")  # which file, as the packed reader says


def test_array_kv_and_alignment_key_are_honoured(tmp_path):
    path = tmp_path / "a.gguf"
    align = ("general.alignment", 4, struct.pack("<I", 64))
    path.write_bytes(gguf_bytes(kvs=[ARRAY_KV, align], tensors=[("a", [8], 0, 64, bytes(32))], alignment=64))
    with G.GGUFFile(path) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "b"] and f.alignment == 64
        assert f.data_offset % 64 == 0
    # the same file with tensors at offset 32 is misaligned under alignment 64
    path.write_bytes(gguf_bytes(kvs=[align], tensors=[("a", [8], 0, 32, bytes(32))], alignment=64))
    with pytest.raises(G.GGUFFormatError, match="alignment 64"):
        G.GGUFFile(path)


def patched_after(good: bytes, key: bytes, raw: bytes, out: Path) -> Path:
    """``good`` with the 4 bytes after ``key`` (a metadata key's name: its type, or with the type its u32 value;
    a tensor's name, n_dims and dims: its type) replaced by ``raw``, written to ``out``."""
    i = good.find(key) + len(key)
    out.write_bytes(good[:i] + raw + good[i + 4 :])
    return out


def test_source_refuses_inconsistent_models(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    # rename one tensor into something unknown: a clear error, not a silent skip
    i = data.find(b"blk.0.attn_q.weight")
    data[i : i + len(b"blk.0.attn_q.weight")] = b"blk.0.attn_x.weight"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(G.GGUFFormatError, match="unexpected tensor 'blk.0.attn_x.weight'"):
        G.GGUFSource(bad)
    # a wrong head count makes the q shape disagree with the config
    key = b"bitnet-b1.58.attention.head_count" + struct.pack("<I", 4)
    with pytest.raises(G.GGUFFormatError, match="shape"):
        G.GGUFSource(patched_after(path.read_bytes(), key, struct.pack("<I", 2), bad))


def test_source_refuses_mistyped_or_inconsistent_metadata(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path)
    good = path.read_bytes()

    def patched(key: bytes, raw: bytes) -> Path:
        return patched_after(good, key, raw, tmp_path / "bad.gguf")

    kv = b"bitnet-b1.58.attention.head_count_kv"
    with pytest.raises(G.GGUFFormatError, match="bitnet-b1.58.attention.head_count_kv = 0 is out of range"):
        G.GGUFSource(patched(kv + struct.pack("<I", 4), struct.pack("<I", 0)))
    with pytest.raises(G.GGUFFormatError, match="head_count 4 is not a multiple of head_count_kv 3"):
        G.GGUFSource(patched(kv + struct.pack("<I", 4), struct.pack("<I", 3)))
    # the same 4 value bytes read as an f32: a float where a count belongs is refused, not truncated
    with pytest.raises(G.GGUFFormatError, match=r"'bitnet-b1.58.attention.head_count_kv' has an unexpected type float"):
        G.GGUFSource(patched(kv, struct.pack("<I", 6)))
    with G.GGUFFile(path) as f, pytest.raises(G.GGUFFormatError, match=r"'blk.0.attn_q.weight' is I2_S, not a float"):
        f.float_tensor("blk.0.attn_q.weight")
    with G.GGUFSource(path) as src, pytest.raises(G.GGUFFormatError, match=r"'norm.weight' is f32, not ternary"):
        src.ternary("norm.weight")
    # a norm stored as a ternary type (its tensor info's type field, after the name, n_dims and the dim)
    norm = b"output_norm.weight" + struct.pack("<IQ", 1, HIDDEN)
    with pytest.raises(G.GGUFFormatError, match="'output_norm.weight' is I2_S; expected a float or quantized float"):
        G.GGUFSource(patched(norm, struct.pack("<I", 36)))
    with G.GGUFSource(path) as src:
        rows = src.config["vocab_size"]
    vocab = b"bitnet-b1.58.vocab_size" + struct.pack("<I", 4)
    with pytest.raises(G.GGUFFormatError, match=f"vocab_size = {rows + 1} but token_embd.weight has {rows} rows"):
        G.GGUFSource(patched(vocab, struct.pack("<I", rows + 1)))
    # lengths and constants past their range, refused naming the GGUF key (not, later, a config field)
    a = "bitnet-b1.58"
    for key, fmt, value in ((f"{a}.context_length", "<I", 0),
                            (f"{a}.attention.layer_norm_rms_epsilon", "<f", float("nan")),
                            (f"{a}.attention.layer_norm_rms_epsilon", "<f", -1.0),
                            (f"{a}.rope.freq_base", "<f", float("inf")),
                            (f"{a}.rope.freq_base", "<f", -5.0)):  # fmt: skip
        gguf_type = struct.pack("<I", 6 if fmt == "<f" else 4)  # FLOAT32 or UINT32: the value follows
        with pytest.raises(G.GGUFFormatError, match=f"'{key}' = {value} must be a positive number"):
            G.GGUFSource(patched(key.encode() + gguf_type, struct.pack(fmt, value)))
    bos = b"tokenizer.ggml.bos_token_id" + struct.pack("<I", 4)
    with pytest.raises(G.GGUFFormatError, match=f"bos_token_id = {rows} is outside the vocabulary of {rows}"):
        G.GGUFSource(patched(bos, struct.pack("<I", rows)))
    eos = b"tokenizer.ggml.eos_token_id" + struct.pack("<I", 4)
    with pytest.raises(G.GGUFFormatError, match=f"tokenizer.ggml.eos_token_id = {rows} is outside the vocabulary"):
        G.GGUFSource(patched(eos, struct.pack("<I", rows)))
    # a tokenizer larger than the embedding: ids past its rows
    write_model(path, vocab_override=rows - 1)
    short = f"the tokenizer has {rows} tokens but token_embd.weight only {rows - 1} rows"
    with pytest.raises(G.GGUFFormatError, match=short):
        G.GGUFSource(path)
    write_model(path, drop=("output_norm.weight",))
    with pytest.raises(G.GGUFFormatError, match="tensor for 'norm.weight' is missing"):
        G.GGUFSource(path)
    write_model(path, drop=("token_embd.weight",))
    with pytest.raises(G.GGUFFormatError, match="tensor 'token_embd.weight' is missing"):
        G.GGUFSource(path)
    # sub-norms in one layer of two: not a model any family describes
    write_model(path, sub_norms={0})
    with pytest.raises(G.GGUFFormatError, match="sub-norm tensors are present in some layers but not all"):
        G.GGUFSource(path)


def test_build_tokenizer_refuses_broken_metadata():
    good = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.token_type": np.ones(3, np.int32), "tokenizer.ggml.bos_token_id": 0}
    assert G.build_tokenizer(good)["bos_token"] == "a"
    for change, match in [
        ({"tokenizer.ggml.model": None}, r"the file carries no tokenizer \(tokenizer.ggml.model is missing\)"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens is missing or not an array of strings"),
        ({"tokenizer.ggml.tokens": ["a", 2, "ab"]}, "tokenizer.ggml.tokens is missing or not an array of strings"),
        ({"tokenizer.ggml.token_type": np.ones(2, np.int32)}, "token_type has 2 entries for 3 tokens"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None}, "asks to add BOS/EOS but"),
        ({"tokenizer.ggml.add_eos_token": True}, "asks to add BOS/EOS but the file gives no bos/eos token id"),
        ({"tokenizer.ggml.model": 5}, r"metadata key 'tokenizer.ggml.model' has an unexpected type int"),
        ({"tokenizer.ggml.bos_token_id": 3}, r"tokenizer.ggml.bos_token_id = 3 is not a token id \(vocabulary of 3\)"),
        ({"tokenizer.ggml.merges": None}, "a gpt2 tokenizer needs tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["a b", "ab"]}, r"merges\[1\] = 'ab' is not two tokens separated by a space"),
        ({"tokenizer.ggml.merges": [" b"]}, r"merges\[0\] = ' b' is not two tokens separated by a space"),
        ({"tokenizer.ggml.model": "llama"}, "a llama tokenizer needs tokenizer.ggml.scores, one per token"),
        ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": np.zeros(2, np.float32)},
         "a llama tokenizer needs tokenizer.ggml.scores, one per token"),
        ({"tokenizer.ggml.pre": "qwen2"}, "unsupported tokenizer.ggml.pre 'qwen2'; supported: llama-bpe"),
    ]:
        md = {k: v for k, v in {**good, **change}.items() if v is not None}
        with pytest.raises(G.GGUFFormatError, match=match):
            G.build_tokenizer(md)


def test_source_float_ternary_linears(tmp_path):
    """F16 linears holding exact c·t (upstream convert_hf_to_gguf output) come back as t2 + c; others refuse."""
    path = tmp_path / "m.gguf"
    ternary, _ = write_model(path, arch="bitnet", qtype="f16")
    with G.GGUFSource(path) as src:
        for name, (t, scale) in ternary.items():
            packed, s = src.ternary(name)
            assert np.array_equal(packed.numpy(), codes_to_t2(t)) and np.array_equal(s.numpy(), scale)
    w = np.array([[0.5, -0.5, 0.0], [0.25, 0.0, 0.5]], np.float32)
    with pytest.raises(G.GGUFFormatError, match="not ternary"):
        G.float_to_t2(w)
    t2, c = G.float_to_t2(w[:1])
    assert c == 0.5 and t2.tolist() == [[0b01_00_10 | 0b01 << 6]]  # +1, -1, 0 and a zero pad code


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # gguf's arithmetic on the random NaN scales
@pytest.mark.parametrize("qtype", sorted(G.DEQUANT_TYPES), ids=lambda q: Q(q).name)
def test_quantized_float_tensor_dequantizes_as_gguf_does(tmp_path, monkeypatch, qtype):
    # random blocks (NaN scales included: compared as equal), five rows read two at a time
    block, per = gguf.GGML_QUANT_SIZES[Q(qtype)]
    raw = RNG.integers(0, 256, size=(5, 256 // block * per), dtype=np.uint8)
    path = tmp_path / "q.gguf"
    path.write_bytes(gguf_bytes(tensors=[("w", [256, 5], int(qtype), 0, raw.tobytes())]))
    monkeypatch.setattr(G, "DEQUANT_ROWS", 2)
    with G.GGUFFile(path) as f:
        got = f.float_tensor("w")
    assert got.dtype == torch.float32 and tuple(got.shape) == (5, 256)
    np.testing.assert_array_equal(got.numpy(), quants.dequantize(raw, Q(qtype)))


def test_llama_quantize_style_embedding_and_head(tmp_path, monkeypatch):
    """llama-quantize writes a TQ2_0 model's token_embd as Q4_K (an untied output as Q6_K): they read as f32,
    load, run, and convert to a packed file with those values."""
    from bitnet158.converter.gguf_convert import gguf_to_packed
    from bitnet158.formats.source import open_source
    from bitnet158.runtime import load

    path = tmp_path / "m.gguf"
    _, floats = write_model(path, arch="bitnet", qtype="tq2_0", tied=False, embed_qtype=Q.Q4_K)
    with G.GGUFSource(path) as src:
        for name in ("embed.weight", "lm_head.weight"):
            assert src.tensors[name].dtype == "f32"
            assert np.array_equal(src.torch(name).numpy(), floats[name]) and np.isfinite(floats[name]).all()
        assert (src.tensors["embed.weight"].gguf_type, src.tensors["lm_head.weight"].gguf_type) == ("Q4_K", "Q6_K")
    made = {}  # the tensors the source hands out, by name
    real = G.GGUFSource.torch

    def torch_of(self, name):
        made[name] = real(self, name)
        return made[name]

    with monkeypatch.context() as m:
        m.setattr(G.GGUFSource, "torch", torch_of)
        model = load(path, device="cpu")
    assert np.array_equal(model.net.embed.numpy(), floats["embed.weight"])
    assert np.array_equal(model.net.head.numpy(), floats["lm_head.weight"])
    # the dequantized tensors are new f32 tensors: the model keeps them instead of a second copy
    assert model.net.embed.data_ptr() == made["embed.weight"].data_ptr()
    assert model.net.head.data_ptr() == made["lm_head.weight"].data_ptr()
    assert torch.isfinite(model.logits([1, 5, 9])).all()
    out = tmp_path / "m.bin"
    gguf_to_packed(path, out)
    with open_source(out) as packed:
        assert np.array_equal(packed.torch("embed.weight").numpy(), floats["embed.weight"])
    # a packed file's f32 embedding is a view of its mapping: the model holds a copy
    from bitnet158.formats.packed import PackedFile

    real = PackedFile.torch
    with monkeypatch.context() as m:
        m.setattr(PackedFile, "torch", torch_of)
        model = load(out, device="cpu")
    assert model.net.embed.data_ptr() != made["embed.weight"].data_ptr()
    assert np.array_equal(model.net.embed.numpy(), floats["embed.weight"])


def test_quantized_linear_weights_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    write_model(path, arch="bitnet", qtype="q8_0")
    with pytest.raises(G.GGUFFormatError, match="Q8_0: a linear weight must be ternary"):
        G.GGUFSource(path)
