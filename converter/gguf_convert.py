"""Packed file <-> GGUF conversion (`bitnet-convert packed-to-gguf` / `gguf-to-packed`).

Export targets (REFERENCE.md §6-7):

- ``i2_s``: Microsoft bitnet.cpp's layout (ggml type 36, one f32 scale per tensor inside the tensor data). A relu²
  model is written as arch ``bitnet-b1.58`` (the 2B-4T graph) with the same metadata keys, tensor names and dtypes as
  Microsoft's ``ggml-model-i2_s.gguf``: F32 norms, an F16 ``token_embd`` that doubles as the head, file type 40. A SiLU
  model (1bitLLM) is written as arch ``bitnet``, the graph bitnet.cpp runs 1bitLLM models with.
- ``tq2_0`` / ``tq1_0``: upstream llama.cpp's ternary types, arch ``bitnet``. That graph hard-codes SiLU, always uses
  ``token_embd`` as the head and needs rows that are multiples of 256, so relu² models, untied heads and other row
  lengths are refused with the reason rather than exported into a file that would silently compute something else.

How a TQ export carries the scale exactly. TQ blocks hold an f16 ``d``; our scales are f32. When a tensor's scale
is exactly representable in f16, every block's ``d`` is that scale and nothing else is written (the plain upstream
layout). Otherwise every ``d`` is 1.0 and the f32 scale goes into an optional ``blk.N.<name>.scale`` tensor of shape
[1], which upstream's ``bitnet`` graph multiplies into the matmul output (``build_lora_mm(w, cur, w_s)``), so the
scale is never rounded. Per-row scales are written as per-block ``d`` when every row scale is f16-exact, and refused
otherwise (the ``.scale`` tensor holds one number).

Float tensors: norms are F32 (exact from bf16/f16). The embedding (and an untied head) is F16 for I2_S, as in
Microsoft's file, with a warning if a value rounds; TQ exports keep the packed file's dtype (BF16 included, which
llama.cpp reads), so every value survives a TQ round trip exactly.

Tokenizer metadata comes from the packed file's tokenizer.json: byte-level BPE -> ``gpt2`` (tokens, types, merges,
``pre`` = ``llama-bpe`` for the Llama-3 split regex, ``gpt-2`` for a plain ByteLevel; any other split is refused,
since it would read back as one of those); SentencePiece-style BPE -> ``llama`` (tokens, scores, types,
add_space_prefix); ids the embedding has beyond the tokenizer become ``[PADi]`` tokens, as Microsoft's converter
writes them.

Import (``gguf_to_packed``) goes through ``bitnet158.formats.gguf.GGUFSource``, which presents a GGUF with the same
read surface as a packed file; codes and scales are copied over unchanged, float tensors keep their dtype.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from bitnet158.converter import converter_version, refuse_source_as_output
from bitnet158.formats import gguf as gguf_fmt
from bitnet158.formats.packed import (PackedFile, PackedWriter, TensorSpec, create_temp_beside, fsync_dir,
                                      tensor_table_error)
from bitnet158.formats.source import SourceError, fetch_from_hub

logger = logging.getLogger(__name__)

EXPORT_TYPES = ("i2_s", "tq2_0", "tq1_0")
I2S_TYPE_ID = 36  # GGML_TYPE_I2_S in bitnet.cpp's ggml fork; unknown to the gguf package
I2S_FILE_TYPE = 40  # LLAMA_FTYPE_MOSTLY_I2_S in bitnet.cpp
TQ_ROW_MULTIPLE = 256  # TQ1_0 / TQ2_0 block length; a block never straddles two rows

# Canonical linear name (PACKED.md §2.2, without "layers.{i}." and ".weight") -> GGUF name inside "blk.{i}.".
LINEAR_NAMES = {
    "attn.q_proj": "attn_q",
    "attn.k_proj": "attn_k",
    "attn.v_proj": "attn_v",
    "attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
LAYER_FLOAT_NAMES = {
    "attn_norm": "attn_norm",
    "attn.sub_norm": "attn_sub_norm",
    "mlp_norm": "ffn_norm",
    "mlp.sub_norm": "ffn_sub_norm",
}
GLOBAL_NAMES = {
    "embed.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")


class GGUFConversionError(ValueError):
    """A packed file or GGUF that cannot be converted; the message names the reason."""


def gguf_tensor_name(canonical: str) -> str:
    """Map a canonical packed tensor name (``layers.3.attn.q_proj.weight``) to its GGUF name (``blk.3.attn_q.weight``)."""
    if canonical in GLOBAL_NAMES:
        return GLOBAL_NAMES[canonical]
    m = _LAYER_RE.match(canonical)
    if m:
        i, inner = m.groups()
        name = LINEAR_NAMES.get(inner) or LAYER_FLOAT_NAMES.get(inner)
        if name:
            return f"blk.{i}.{name}.weight"
    raise GGUFConversionError(f"tensor {canonical!r} has no GGUF name")


# --------------------------------------------------------------------------------------------------------------
# tokenizer -> GGUF metadata
# --------------------------------------------------------------------------------------------------------------

# gguf TokenType values (llama.cpp llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _walk(node: Any):
    """Yield every dict inside a tokenizer.json component (Sequence nesting included)."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _gpt2_pre(tj: dict, added: dict) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json, or GGUFConversionError where no name reads back (here,
    formats/gguf.py's build_tokenizer, and in llama.cpp) as a tokenizer that gives every text the same ids. Two do:
    llama-bpe, the Llama-3 split (isolated) then ByteLevel without its own regex, merges ignored for a word in the
    vocabulary; gpt-2, ByteLevel with the GPT-2 regex. Either with no normalizer, no prefix space, a BPE model
    without dropout, affixes or byte fallback, and added tokens matched as they are (no strip, not whole-word)."""

    def refuse(why: str):
        raise GGUFConversionError(f"the tokenizer {why}; GGUF's gpt2 tokenizer has no way to say so, and its GGUF "
                                  "would tokenize text differently")  # fmt: skip

    normalizers = sorted({d["type"] for d in _walk(tj.get("normalizer")) if "type" in d} - {"Sequence"})
    if normalizers:  # (an empty Sequence normalizes nothing)
        refuse(f"has a normalizer ({', '.join(normalizers)})")
    pre_tok = tj.get("pre_tokenizer")
    if any(d.get("type") == "ByteLevel" and d.get("add_prefix_space") for d in _walk(pre_tok)):
        refuse("adds a prefix space (ByteLevel add_prefix_space)")
    sequence = isinstance(pre_tok, dict) and pre_tok.get("type") == "Sequence"
    steps = pre_tok.get("pretokenizers") if sequence else [pre_tok]

    def byte_level(d, regex: bool) -> bool:
        return isinstance(d, dict) and d.get("type") == "ByteLevel" and d.get("use_regex", True) == regex

    first = steps[0] if steps else None
    if len(steps) == 2 and isinstance(first, dict) and first.get("type") == "Split" and not first.get("invert") and \
            first.get("behavior") == "Isolated" and first.get("pattern") == {"Regex": gguf_fmt.LLAMA3_SPLIT_REGEX} and \
            byte_level(steps[1], False):  # fmt: skip
        name = "llama-bpe"
    elif len(steps) == 1 and byte_level(first, True):
        name = "gpt-2"
    else:
        shown = [d.get("type", "?") if isinstance(d, dict) else repr(d) for d in steps]
        regexes = [(d.get("pattern") or {}).get("Regex") for d in _walk(pre_tok) if d.get("type") == "Split"]
        refuse(f"has a pre-tokenizer {shown} that splits by {regexes or 'no regex'}, which has no tokenizer.ggml.pre "
               "name here (llama-bpe is the Llama-3 split, then ByteLevel; gpt-2 a plain ByteLevel)")  # fmt: skip
    model = tj["model"]
    odd = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback") if model.get(k)]
    if odd:
        refuse(f"BPE model sets {', '.join(odd)}")
    stripped = [a["content"] for a in added.values() if a.get("lstrip") or a.get("rstrip") or a.get("single_word")]
    if stripped:
        refuse(f"matches added token {stripped[0]!r} with lstrip, rstrip or single_word")
    if bool(model.get("ignore_merges")) != (name == "llama-bpe"):
        # ignore_merges takes a word that is in the vocabulary whole instead of merging it; that changes ids only
        # for a (non-added) token that its merges do not make whole, so where none is, either way is the same
        from tokenizers import Tokenizer

        bare = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": None, "post_processor": None, "decoder": None,
                "model": {**model, "ignore_merges": False}}
        plain = Tokenizer.from_str(json.dumps(bare))  # the BPE model alone, merging every word
        words = [w for w, i in model["vocab"].items() if i not in added]
        split = next((w for w, e in zip(words, plain.encode_batch(words, add_special_tokens=False))
                      if e.ids != [model["vocab"][w]]), None)  # fmt: skip
        if split is not None:
            refuse(f"{'does not ignore' if name == 'llama-bpe' else 'ignores'} merges for words in its vocabulary "
                   f"(ignore_merges), and its merges split the token {split!r}")  # fmt: skip
    return name


@dataclass
class TokenizerMetadata:
    """What goes into the ``tokenizer.*`` GGUF keys."""

    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    merges: list[str]
    add_space_prefix: bool | None


def tokenizer_metadata(tokenizer: dict, vocab_size: int) -> TokenizerMetadata:
    """Derive GGUF tokenizer metadata from our tokenizer dict (PACKED.md §4).

    Byte-level BPE becomes ``gpt2`` (tokens, types, merges); a split this cannot name in ``tokenizer.ggml.pre`` is
    refused. SentencePiece-style BPE (byte fallback / Metaspace) becomes ``llama`` (tokens, scores, types); the score
    of a token is minus the rank of the merge that makes it, which is the priority llama.cpp's SPM tokenizer merges
    by. Other models (Unigram, WordPiece) are refused.
    """
    try:
        tj = json.loads(tokenizer["tokenizer_json"])
        model = tj["model"]
        mtype = model["type"]
    except (KeyError, TypeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise GGUFConversionError(f"the packed file's tokenizer_json is not a tokenizers serialization: {e}") from e

    if mtype != "BPE":
        # a Unigram model would need llama.cpp's "t5" tokenizer (Viterbi over scores); as "llama" it would merge by
        # score and split text differently
        raise GGUFConversionError(f"tokenizer model type {mtype!r} cannot be written to GGUF here (BPE can)")
    try:
        pieces = {int(idx): tok for tok, idx in model["vocab"].items()}
        added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
        for idx, a in added.items():
            pieces[idx] = a["content"]
        raw_merges = model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
        # GGUF's merges are "left right" strings: a merge that is not two tokens without spaces has no such form
        bad = next((m for m in merges if len(m.split(" ")) != 2 or not all(m.split(" "))), None)
        if bad is not None:
            raise ValueError(f"merge {bad!r} is not two tokens separated by one space")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise GGUFConversionError(f"the packed file's tokenizer_json has a malformed vocab, added_tokens or merges "
                                  f"({type(e).__name__}: {e})") from e
    scores: dict[int, float] = {}

    if pieces and max(pieces) >= vocab_size:
        raise GGUFConversionError(
            f"tokenizer has token id {max(pieces)} but the model's vocab_size is {vocab_size}"
        )
    byte_level = any(d.get("type") == "ByteLevel" for d in _walk([tj.get("pre_tokenizer"), tj.get("decoder")]))
    kind = "gpt2" if byte_level else "llama"
    if kind == "gpt2" and not merges:
        # GGUF has no empty arrays (gguf-py refuses them), and llama.cpp and our reader need tokenizer.ggml.merges
        raise GGUFConversionError("a byte-level BPE tokenizer without merges cannot be written to GGUF "
                                  "(tokenizer.ggml.merges must be a non-empty list)")  # fmt: skip
    if kind == "llama":
        index = {tok: i for i, tok in pieces.items()}
        for rank, m in enumerate(merges):
            left, _, right = m.partition(" ")
            produced = index.get(left + right)
            if produced is not None and produced not in scores:
                scores[produced] = -float(rank)

    unk = model.get("unk_token")
    if unk is None and kind == "llama" and "<unk>" in pieces.values():
        # transformers' SentencePiece -> tokenizer.json conversion drops unk_token; SentencePiece's is "<unk>"
        unk = "<unk>"
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types, score_list = [], [], []
    for i in range(vocab_size):
        tok = pieces.get(i)
        if tok is None or tok == f"[PAD{i}]" and i not in added:  # (or such a row read back from a GGUF)
            # ids the embedding has but the tokenizer never emits (padding rows), named as llama.cpp's converter
            # names them. UNUSED, as it types them: a USER_DEFINED one (Microsoft's converter) is an added token in
            # llama.cpp and our reader, so the text "[PAD310]" would become that untrained id
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            score_list.append(-1000.0 if kind == "llama" else 0.0)
            continue
        tokens.append(tok)
        if tok == unk:
            types.append(_UNKNOWN)
        elif i in added:
            types.append(_CONTROL if added[i].get("special") else _USER_DEFINED)
        elif kind == "llama" and byte_fallback and _BYTE_TOKEN.match(tok):
            types.append(_BYTE)
        else:
            types.append(_NORMAL)
        score_list.append(scores.get(i, 0.0))

    try:
        pre = _gpt2_pre(tj, added) if kind == "gpt2" else None
    except GGUFConversionError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # a normalizer or pre-tokenizer of the wrong shape (a list as a type, a number as the steps, a pattern
        # that is not an object): one error, not a traceback
        raise GGUFConversionError(f"the packed file's tokenizer_json has a malformed normalizer, pre_tokenizer or "
                                  f"model ({type(e).__name__}: {e})") from e

    add_space_prefix = None
    if kind == "llama":
        prepend = any(
            (d.get("type") == "Prepend" and d.get("prepend") == "\u2581")
            or (d.get("type") == "Metaspace" and d.get("prepend_scheme", "always") != "never" and d.get("add_prefix_space", True))
            for d in _walk([tj.get("normalizer"), tj.get("pre_tokenizer")])
        )
        add_space_prefix = prepend
        metaspaces = [d for d in _walk(tj.get("pre_tokenizer")) if d.get("type") == "Metaspace"]
        if any(d.get("prepend_scheme") == "first" for d in metaspaces):
            # no GGUF key says "first": llama.cpp's add_space_prefix prepends to every piece of text between special
            # tokens, and to a text that starts with a space
            logger.warning("the tokenizer prepends '▁' once, at the start of the text (Metaspace prepend_scheme "
                           "first); GGUF's llama tokenizer (llama.cpp, and this package's reader) also prepends one "
                           "after each special token and before a leading space, so such text tokenizes differently")
    return TokenizerMetadata(kind, pre, tokens, score_list, types, merges if kind == "gpt2" else [], add_space_prefix)


# --------------------------------------------------------------------------------------------------------------
# packed -> GGUF
# --------------------------------------------------------------------------------------------------------------


def _check_exportable(config: dict, qtype: str) -> str:
    """Refuse models the target graph would run differently; return the GGUF architecture name."""
    act = config["hidden_act"]
    if not config["sub_norms"]:
        raise GGUFConversionError(
            "the model has no attention/MLP sub-norms; the bitnet GGUF graphs (bitnet.cpp and llama.cpp) always apply "
            "them, so they would run a different network"
        )
    if config["num_attention_heads"] * config["head_dim"] != config["hidden_size"]:
        raise GGUFConversionError(
            f"num_attention_heads × head_dim = {config['num_attention_heads'] * config['head_dim']} differs from "
            f"hidden_size = {config['hidden_size']}; the bitnet GGUF graphs assume they are equal"
        )
    if config.get("rope_scaling"):
        raise GGUFConversionError(f"rope_scaling {config['rope_scaling']!r} cannot be expressed in a bitnet GGUF")
    if config.get("rope_style", "neox") != "neox":
        raise GGUFConversionError(f"rope_style {config['rope_style']!r}: the bitnet GGUF graphs use NeoX rope")
    if qtype == "i2_s":
        if act == "relu2":
            return "bitnet-b1.58"
        if act == "silu":
            return "bitnet"
        raise GGUFConversionError(f"hidden_act {act!r} has no bitnet.cpp graph")
    if act != "silu":
        raise GGUFConversionError(
            f"{qtype.upper()} export is for upstream llama.cpp's 'bitnet' architecture, whose graph hard-codes SiLU; "
            f"this model uses {act!r}, which llama.cpp would silently run as SiLU and produce wrong output. "
            "Export it with --type i2_s for bitnet.cpp instead"
        )
    if not config["tie_word_embeddings"]:
        raise GGUFConversionError(
            f"{qtype.upper()} export: upstream llama.cpp's 'bitnet' graph always uses token_embd as the output head, "
            "but this model has a separate lm_head.weight"
        )
    return "bitnet"


def _check_rows(name: str, shape: tuple[int, ...], qtype: str) -> None:
    if qtype in ("tq1_0", "tq2_0") and shape[1] % TQ_ROW_MULTIPLE:
        raise GGUFConversionError(
            f"{qtype.upper()} needs rows whose length is a multiple of {TQ_ROW_MULTIPLE}; tensor {name} has "
            f"{shape[1]} columns"
        )
    if qtype == "i2_s" and shape[1] % gguf_fmt.QK_I2_S:
        raise GGUFConversionError(
            f"I2_S needs rows whose length is a multiple of {gguf_fmt.QK_I2_S} (bitnet.cpp's kernels walk whole "
            f"128-weight blocks per row); tensor {name} has {shape[1]} columns"
        )


def _f16_exact(x: np.ndarray) -> bool:
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(x.astype(np.float16).astype(np.float32), x))


@dataclass
class _Planned:
    """One GGUF tensor: its name, numpy shape (row-major), GGML type, byte count and how to produce the bytes."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    nbytes: int
    produce: Any  # () -> numpy array (uint8 bytes for quantized types)


_GGUF_FLOAT = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
               "bf16": gguf.GGMLQuantizationType.BF16}
_TORCH_FLOAT = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
                gguf.GGMLQuantizationType.BF16: torch.bfloat16}


def _float_tensor(src: PackedFile, name: str, gname: str, ggml_type: int) -> _Planned:
    """Plan a float tensor converted to `ggml_type` (F32, F16 or BF16); a lossy conversion is logged."""
    info = src.tensors[name]
    tdtype = _TORCH_FLOAT[ggml_type]
    shape = tuple(info.shape)

    def produce() -> np.ndarray:
        t = src.torch(name)
        out = t.to(tdtype)
        t32, out32 = t.float(), out.float()
        if not torch.equal(out32, t32):  # an overflow is inexact too: checked only then, in one pass each
            type_name = gguf.GGMLQuantizationType(ggml_type).name
            over = torch.isinf(out32).logical_and_(torch.isfinite(t32))  # finite values that the cast made inf
            if over.any():
                raise GGUFConversionError(f"{name}: {int(over.sum())} values are beyond {type_name}'s range and "
                                          "would be written as inf")  # fmt: skip
            bad = int((out32 != t32).sum())
            logger.warning("%s: %d of %d values are not exact in %s (stored rounded)", gname, bad, t.numel(), type_name)
        # raw little-endian bytes (numpy has no bfloat16)
        return out.contiguous().view(torch.uint8).numpy()

    return _Planned(gname, shape, int(ggml_type), int(np.prod(shape)) * torch.finfo(tdtype).bits // 8, produce)


def _ternary_tensor(src: PackedFile, name: str, gname: str, qtype: str) -> list[_Planned]:
    """Plan a linear weight (and, for TQ with a non-f16 scale, its ``.scale`` tensor)."""
    info = src.tensors[name]
    out_f, in_f = info.shape
    _check_rows(name, (out_f, in_f), qtype)
    n = out_f * in_f
    _, scale = src.ternary(name)
    scale_np = scale.to(torch.float32).numpy().copy()

    if qtype == "i2_s":
        if scale_np.size != 1 and not np.all(scale_np == scale_np[0]):
            raise GGUFConversionError(
                f"I2_S holds one scale per tensor; {name} has per-row scales that differ"
            )
        s = float(scale_np.reshape(-1)[0])

        def produce_i2s() -> np.ndarray:
            packed, _ = src.ternary(name)
            return np.frombuffer(gguf_fmt.t2_to_i2s(packed, (out_f, in_f), s), dtype=np.uint8)

        return [_Planned(gname, (out_f, in_f), I2S_TYPE_ID, n // 4 + 32, produce_i2s)]

    gtype = gguf.GGMLQuantizationType.TQ2_0 if qtype == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    block, type_size = gguf.GGML_QUANT_SIZES[gtype]
    nbytes = n // block * type_size
    extra: list[_Planned] = []
    if scale_np.size == 1 or np.all(scale_np == scale_np[0]):
        s = np.float32(scale_np.reshape(-1)[0])
        if _f16_exact(s):
            d = np.full(out_f, s, dtype=np.float32)
        else:
            # f16 would round the scale: store d = 1 and the exact f32 scale in the tensor llama.cpp multiplies by
            logger.info("%s: scale %r is not exact in f16; writing it as f32 tensor %s", name, float(s),
                        gname.replace(".weight", ".scale"))
            d = np.ones(out_f, dtype=np.float32)
            extra.append(
                _Planned(gname.replace(".weight", ".scale"), (1,), int(gguf.GGMLQuantizationType.F32), 4,
                         lambda s=s: np.array([s], dtype=np.float32))
            )
    else:
        if not _f16_exact(scale_np):
            raise GGUFConversionError(
                f"{name} has per-row scales that are not exact in f16; {qtype.upper()} can carry per-row scales only "
                "in its f16 block scales (the optional .scale tensor holds one number)"
            )
        d = scale_np
    d_blocks = np.repeat(d, in_f // TQ_ROW_MULTIPLE)  # one f16 d per 256-weight block, blocks in row order
    encode = gguf_fmt.t2_to_tq2_0 if qtype == "tq2_0" else gguf_fmt.t2_to_tq1_0

    def produce_tq() -> np.ndarray:
        packed, _ = src.ternary(name)
        return np.frombuffer(encode(packed, (out_f, in_f), d_blocks), dtype=np.uint8)

    return [_Planned(gname, (out_f, in_f), int(gtype), nbytes, produce_tq), *extra]


def _plan(src: PackedFile, qtype: str) -> list[_Planned]:
    planned: list[_Planned] = []
    cfg = src.config
    # I2_S: an F16 embedding/head as in Microsoft's file (bitnet.cpp's fork expects it). TQ: the packed file's own
    # float dtype, which upstream llama.cpp reads too (BF16 included), so the embedding is carried exactly.
    head_type = (gguf.GGMLQuantizationType.F16 if qtype == "i2_s"
                 else _GGUF_FLOAT[src.tensors["embed.weight"].dtype])
    planned.append(_float_tensor(src, "embed.weight", "token_embd.weight", head_type))
    for i in range(cfg["num_hidden_layers"]):
        for inner, gname in LAYER_FLOAT_NAMES.items():
            planned.append(
                _float_tensor(src, f"layers.{i}.{inner}.weight", f"blk.{i}.{gname}.weight",
                              gguf.GGMLQuantizationType.F32)
            )
        for inner, gname in LINEAR_NAMES.items():
            planned.extend(_ternary_tensor(src, f"layers.{i}.{inner}.weight", f"blk.{i}.{gname}.weight", qtype))
    planned.append(_float_tensor(src, "norm.weight", "output_norm.weight", gguf.GGMLQuantizationType.F32))
    if not cfg["tie_word_embeddings"]:
        logger.warning(
            "untied head written as output.weight; bitnet.cpp's bitnet-b1.58 graph uses token_embd as the head regardless"
        )
        planned.append(_float_tensor(src, "lm_head.weight", "output.weight", head_type))
    return planned


def _add_metadata(w: gguf.GGUFWriter, cfg: dict, tok: dict, prov: dict, qtype: str) -> None:
    """Write the KV pairs in the order of Microsoft's ggml-model-i2_s.gguf (general.architecture is added by the writer)."""
    for key in ("vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "intermediate_size",
                "head_dim", "num_attention_heads", "num_key_value_heads"):
        if cfg[key] >= 2**32:  # positive (the packed reader checks), GGUF holds them as uint32
            raise GGUFConversionError(f"config {key} {cfg[key]} does not fit GGUF's uint32")
    for key in ("rms_norm_eps", "rope_theta"):
        # GGUF holds them as float32, where a value past its range is inf and one below its smallest is 0
        if not abs(cfg[key]) <= float(np.finfo(np.float32).max) or np.float32(cfg[key]) == 0 != cfg[key]:
            raise GGUFConversionError(f"config {key} {cfg[key]} does not fit GGUF's float32")
    # the name an imported GGUF had, else the source's (a hub id's model, a folder's or file's name)
    name = prov.get("name")  # a str in files we write; the header is not checked for it
    w.add_name(name if isinstance(name, str) and name else Path(str(prov.get("source") or "model")).name or "model")
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_add_bos_token(bool(tok.get("add_bos_token")))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    file_type = {
        "i2_s": I2S_FILE_TYPE,
        "tq2_0": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
        "tq1_0": int(gguf.LlamaFileType.MOSTLY_TQ1_0),
    }[qtype]
    w.add_file_type(file_type)

    meta = tokenizer_metadata(tok, cfg["vocab_size"])
    w.add_tokenizer_model(meta.model)
    if meta.pre:
        w.add_tokenizer_pre(meta.pre)
    w.add_token_list(meta.tokens)
    w.add_token_scores(meta.scores)
    w.add_token_types(meta.token_types)
    if meta.merges:
        w.add_token_merges(meta.merges)
    def first_id(text: str | None) -> int | None:  # a token's (first) id by its text
        return next((i for i, t in enumerate(meta.tokens) if t == text), None) if text is not None else None

    bos = cfg.get("bos_token_id")
    if bos is None:  # the tokenizer's own BOS, which the reader needs where the tokenizer adds it
        bos = first_id(tok.get("bos_token"))
    if bos is not None:
        w.add_bos_token_id(int(bos))
    elif tok.get("add_bos_token"):
        raise GGUFConversionError("the tokenizer adds a BOS, but the file names no BOS token (config bos_token_id, "
                                  "tokenizer bos_token): its GGUF could not say which")  # fmt: skip
    # our config lists every stop id (2B-4T: <|end_of_text|>, <|eot_id|>); GGUF has keys for three (eos, eot, eom),
    # and llama.cpp, like our reader, also stops on the tokens whose text it knows (LLAMA_CPP_EOG_TEXTS). The
    # tokenizer's EOS goes first, as eos: its text is the eos_token that a chat template writes after the GGUF is
    # read back; then the ids that only a key can name
    eos_id = first_id(tok.get("eos_token"))
    by_text = set(gguf_fmt.llama_cpp_eog_ids(meta.tokens))
    eos = sorted(cfg.get("eos_token_id") or [], key=lambda i: (i != eos_id, i in by_text))  # stable
    for token_id, add in zip(eos, (w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id)):
        add(int(token_id))
    lost = [i for i in eos[3:] if i not in by_text]
    if lost:
        logger.warning("stop ids %s are not written: GGUF holds three (eos, eot, eom)", lost)
    if tok.get("add_eos_token"):
        w.add_add_eos_token(True)
    if meta.add_space_prefix is not None:
        w.add_add_space_prefix(meta.add_space_prefix)
    if tok.get("chat_template"):
        w.add_chat_template(tok["chat_template"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _reserve(path: str, size: int) -> None:
    """Allocate the whole file up front, as PackedWriter._reserve does (a method there, so not reusable here): a
    full disk then fails now with ENOSPC, not as numpy's short write half way through, whose OSError has no errno
    ("N requested and M written") and would not be reported as a full disk."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # cannot preallocate: write as it comes
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    finally:
        os.close(fd)


def packed_to_gguf(src_path: str | os.PathLike, out_path: str | os.PathLike, *, qtype: str = "i2_s",
                   force: bool = False, progress: bool = False) -> dict:
    """Export a packed file to GGUF with ternary type ``qtype`` (``i2_s``, ``tq2_0`` or ``tq1_0``).

    Writes a temp file beside ``out_path`` and renames it at the end; refuses an existing ``out_path`` unless
    ``force``. Returns a summary dict (arch, type, tensors, bytes).
    """
    qtype = qtype.lower()
    if qtype not in EXPORT_TYPES:
        raise GGUFConversionError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(EXPORT_TYPES)}")
    out_path = Path(out_path)
    if os.path.lexists(out_path) and not force:  # lexists: a dangling symlink is an existing output too
        raise GGUFConversionError(f"{out_path} exists; pass --force to overwrite it")
    refuse_source_as_output(out_path, [src_path], GGUFConversionError)

    with PackedFile(src_path) as src:
        cfg, tok, prov = src.config, src.tokenizer, src.provenance
        why = tensor_table_error(cfg, src.tensors)  # a lying layer count or vocab_size: before anything is written
        if why is not None:
            raise GGUFConversionError(why)
        arch = _check_exportable(cfg, qtype)
        planned = _plan(src, qtype)

        fd, tmp = create_temp_beside(out_path)
        os.close(fd)
        try:
            w = gguf.GGUFWriter(tmp, arch)
            _add_metadata(w, cfg, tok, prov, qtype)
            for p in planned:
                # The dtype argument only keeps GGUFWriter from reinterpreting `shape` as a byte shape: it is the
                # logical (row-major) shape, which the writer reverses into ggml's ne order.
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.ggml_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()  # (flushed: the file now holds the header)
            # the file's final size: the header padded, then each tensor padded (as write_tensor_data pads)
            size = w.ggml_pad(os.path.getsize(tmp), w.data_alignment)
            size += sum(w.ggml_pad(p.nbytes, w.data_alignment) for p in planned)
            _reserve(tmp, size)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(planned), desc="tensors", unit="t")
            for p in planned:
                data = np.ascontiguousarray(p.produce())
                if data.nbytes != p.nbytes:
                    raise GGUFConversionError(f"{p.name}: encoded {data.nbytes} bytes, expected {p.nbytes}")
                w.write_tensor_data(data)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            w.close()
            if os.path.getsize(tmp) != size:  # the reservation must not leave bytes past the GGUF's end
                raise GGUFConversionError(f"internal error: wrote {os.path.getsize(tmp)} bytes, reserved {size}")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            if not force and os.path.lexists(out_path):  # appeared while we were writing
                raise GGUFConversionError(f"{out_path} exists; pass --force to overwrite it")
            os.replace(tmp, out_path)
            fsync_dir(str(out_path.parent.resolve()))
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # say which file, and that nothing is left over
                total = sum(p.nbytes for p in planned)
                raise OSError(errno.ENOSPC, f"no space left on the device while writing {out_path} ({total} bytes of "
                                            "tensors); nothing was written") from e  # fmt: skip
            raise
    total = sum(p.nbytes for p in planned)
    logger.info("wrote %s: arch %s, %d tensors, %d data bytes", out_path, arch, len(planned), total)
    n_scale = sum(p.name.endswith(".scale") for p in planned)
    return {"path": str(out_path), "arch": arch, "type": qtype, "tensors": len(planned), "data_bytes": total,
            "scale_tensors": n_scale}


# --------------------------------------------------------------------------------------------------------------
# GGUF -> packed
# --------------------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_to_packed(src: str | os.PathLike, out_path: str | os.PathLike, *, activation: str | None = None,
                   force: bool = False, progress: bool = False) -> dict:
    """Convert a GGUF (I2_S, TQ1_0, TQ2_0) to a packed file: codes bit-exact, scales exact, floats in their dtype.

    ``src``: a GGUF file or a hub spec (formats/source.py's ``fetch_from_hub``). ``activation`` overrides the
    activation the GGUF's architecture implies (Microsoft's converter labels 1bitLLM models ``bitnet-b1.58`` too).
    Returns a summary dict.
    """
    out_path = Path(out_path)
    if os.path.lexists(out_path) and not force:  # before any download; a dangling symlink exists too
        raise GGUFConversionError(f"{out_path} exists; pass --force to overwrite it")
    try:
        src_path, source, revision = fetch_from_hub(os.fspath(src))
    except SourceError as e:
        raise GGUFConversionError(str(e)) from None
    src_path = Path(src_path).resolve()
    refuse_source_as_output(out_path, [src_path], GGUFConversionError)
    with gguf_fmt.GGUFSource(src_path, activation=activation) as src:
        # The packed tensor table is fixed up front, and a scale's shape ([1] or [out]) is only known after the
        # TQ block scales are folded: decode each ternary tensor once here and keep just its (small) scale.
        specs: list[TensorSpec] = []
        scales: dict[str, torch.Tensor] = {}
        for name, info in src.tensors.items():
            if info.dtype == "t2":
                _, scale = src.ternary(name)
                scales[name + "_scale"] = scale.to(torch.float32).contiguous()
                gran = "tensor" if scale.numel() == 1 else "row"
                specs.append(TensorSpec(name, "t2", tuple(info.shape), scale=name + "_scale", scale_granularity=gran))
                specs.append(TensorSpec(name + "_scale", "f32", tuple(scale.shape)))
            else:
                specs.append(TensorSpec(name, info.dtype, tuple(info.shape)))
        prov = {
            "source": source,
            "revision": revision,
            "files": {src_path.name: _sha256(src_path)},
            "converter": converter_version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "gguf_architecture": src.arch,
        }
        if isinstance(src.metadata.get(gguf.Keys.General.NAME), str):  # for a re-export (_add_metadata)
            prov["name"] = src.metadata[gguf.Keys.General.NAME]
        names = [s.name for s in specs]
        if progress:
            from tqdm import tqdm

            names = tqdm(names, desc="tensors", unit="t")
        with PackedWriter(out_path, config=src.config, tokenizer=src.tokenizer, provenance=prov, tensors=specs,
                          overwrite=force) as w:
            for name in names:
                if name in scales:
                    w.write(name, scales[name])
                elif src.tensors[name].dtype == "t2":
                    w.write(name, src.ternary(name)[0])
                else:
                    w.write(name, src.torch(name))
    return {"path": str(out_path), "tensors": len(specs), "arch": prov["gguf_architecture"]}
