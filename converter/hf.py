"""Hugging Face BitNet b1.58 checkpoint → bitnet158 packed file (formats/PACKED.md).

Three checkpoint families are recognised from config.json and the tensor names (shared/REFERENCE.md §1):

- ``bitnet``: Microsoft 2B-4T style (``BitNetForCausalLM``, model_type ``bitnet``), relu², sub-norms
  ``attn_sub_norm``/``ffn_sub_norm``; linears packed (uint8 [out/4, in] + ``weight_scale``) or latent masters.
- ``1bitllm``: ``BitnetForCausalLM`` with model_type ``llama``, SiLU, sub-norms ``inner_attn_ln``/``ffn_layernorm``,
  latent weights.
- ``llama-bitnet``: ``LlamaForCausalLM`` with ``quantization_config.quant_method == "bitnet"``, SiLU, no sub-norms,
  packed weights.

Anything else is refused with one clear error. In particular a plain Llama config is never taken for BitNet (and
a BitNet-looking checkpoint never falls back to plain Llama): that silent fallback is the bug this project exists
to fix (REFERENCE.md §5).

Weights are read one tensor at a time (safetensors ``safe_open``, or an mmapped ``torch.load`` behind
``allow_pickle``), so memory stays bounded by the largest tensor. Linear weights become ternary codes with one f32
scale each, W = scale · t:

- latent masters: exactly the reference absmean ternarization (``formats.ternary.absmean_ternarize``), unless the
  tensor already is c · t (a fake-quantized export), in which case c is kept;
- packed HF weights: ``unpack_hf`` gives the codes with no float round trip; ``weight_scale`` multiplies for
  ``linear_class: autobitlinear`` and divides for ``bitlinear`` (the transformers default), so the latter is
  stored as 1/weight_scale computed in f32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from bitnet158.converter import converter_version, refuse_source_as_output
from bitnet158.converter.tokenizer import (
    TOKENIZER_PATTERNS,
    TokenizerError,
    embedding_rows,
    normalize_tokenizer,
)
from bitnet158.formats import ternary
from bitnet158.formats.config import ConfigError, ModelConfig, as_float
from bitnet158.formats.packed import PackedWriter, TensorSpec, model_tensors, output_folder_error
from bitnet158.formats.source import HUB_ID

log = logging.getLogger(__name__)

FAMILIES = ("bitnet", "1bitllm", "llama-bitnet")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# rope_scaling types the runtime implements; the dict is stored as transformers writes it.
SUPPORTED_ROPE_SCALING = ("llama3", "linear")

# Files fetched from the hub: config, weights (safetensors, single or sharded) and the tokenizer.
_META_FILES = ("config.json", "generation_config.json", *TOKENIZER_PATTERNS)
_SAFETENSORS_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")
_PICKLE_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """The source cannot be converted; the message names the problem (a file, key or tensor)."""


# ---------------------------------------------------------------------------------------------------------------
# The name map: HF tensor name -> canonical name (PACKED.md §2.2), one table per family.
# "{i}" is the layer index. kind "linear" becomes a t2 weight + f32 scale, "float" stays a float tensor.
# ---------------------------------------------------------------------------------------------------------------
_LAYER_COMMON = [
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.weight", "float"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.weight", "linear"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.weight", "linear"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.weight", "linear"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.weight", "linear"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.weight", "float"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight", "linear"),
]
NAME_MAPS: dict[str, list[tuple[str, str, str]]] = {
    "bitnet": _LAYER_COMMON + [
        ("model.layers.{i}.self_attn.attn_sub_norm.weight", "layers.{i}.attn.sub_norm.weight", "float"),
        ("model.layers.{i}.mlp.ffn_sub_norm.weight", "layers.{i}.mlp.sub_norm.weight", "float"),
    ],
    "1bitllm": _LAYER_COMMON + [
        ("model.layers.{i}.self_attn.inner_attn_ln.weight", "layers.{i}.attn.sub_norm.weight", "float"),
        ("model.layers.{i}.mlp.ffn_layernorm.weight", "layers.{i}.mlp.sub_norm.weight", "float"),
    ],
    "llama-bitnet": list(_LAYER_COMMON),
}
_GLOBAL_MAP = [
    ("model.embed_tokens.weight", "embed.weight", "float"),
    ("model.norm.weight", "norm.weight", "float"),
    ("lm_head.weight", "lm_head.weight", "float"),
]
# Source tensors that carry nothing the packed file needs, with the reason they are skipped.
SKIPPED = [
    (re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$"),
     "rotary inv_freq is recomputed from rope_theta"),
]


class CanonicalTensor(NamedTuple):
    """One output tensor: canonical name, kind and a loader.

    kind "linear": ``load()`` returns (t int8 [out, in] in {-1, 0, 1}, scale: python float of an f32 > 0),
    meaning W = scale · t. kind "float": ``load()`` returns the source tensor in its source dtype.
    """

    name: str
    kind: str
    load: Callable[[], object]


@dataclass
class ConversionSummary:
    """What ``convert_hf`` wrote."""

    out: str
    family: str
    form: str                 # "packed", "latent" or "mixed": how the source stored its linear weights
    tensors: int              # entries in the file (t2 weights, their scales and float tensors)
    parameters: int           # logical parameters: ternary weights + float elements (scales not counted)
    ternary_weights: int
    bits_per_ternary_weight: float  # (t2 bytes + f32 scale bytes) · 8 / ternary weights
    file_size: int
    seconds: float
    kept_scaled_ternary: int  # latent tensors that already were c · t and kept c


# ---------------------------------------------------------------------------------------------------------------
# Reading weights
# ---------------------------------------------------------------------------------------------------------------
class _WeightFiles:
    """Name → tensor access over the checkpoint's weight files, one tensor at a time."""

    def __init__(self, folder: Path, allow_pickle: bool):
        self.folder = folder
        self.files: list[str] = []
        self._where: dict[str, str] = {}    # tensor name -> file name
        self._handles: dict[str, object] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self._from_index(index)
        elif (folder / "model.safetensors").is_file():
            self._add_safetensors("model.safetensors")
        else:
            bins = [p for p in ("pytorch_model.bin.index.json", "pytorch_model.bin") if (folder / p).is_file()]
            if not bins:
                raise ConversionError(f"{folder}: no model.safetensors, model.safetensors.index.json or "
                                      "pytorch_model.bin (a hub repo that ships only pytorch_model.bin is fetched "
                                      "with --allow-pickle)")
            if not allow_pickle:
                raise ConversionError(
                    f"{folder} has only {bins[0]}, a Python pickle: loading a pickle can run arbitrary code, so it "
                    "is refused by default. If you trust this source, rerun with --allow-pickle (it is then read "
                    "with torch.load(weights_only=True)).")
            self._from_pickle(bins[0])

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        """An index file's weight_map: tensor name -> weight file name, both strings (a number or a list as the
        file name once reached sorted() and the path joins as a TypeError)."""
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise ConversionError(f"{index.name}: cannot read its weight_map ({e})") from e
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index.name}: weight_map is not an object")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise ConversionError(f"{index.name}: weight_map maps {bad[0]} to {bad[1]!r:.80}, not a file name")
        return weight_map

    def _from_index(self, index: Path) -> None:
        weight_map = self._weight_map(index)
        self.files.append(index.name)
        for shard in sorted(set(weight_map.values())):
            self._add_safetensors(shard)
        for name, shard in weight_map.items():
            if self._where.get(name) != shard:
                raise ConversionError(f"{index.name}: tensor {name} is mapped to {shard}, which does not hold it")

    def _add_safetensors(self, fname: str) -> None:
        from safetensors import safe_open

        path = self.folder / fname
        if "/" in fname or "\\" in fname or not path.is_file():
            raise ConversionError(f"weight file {fname} is missing from {self.folder}")
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise ConversionError(f"{fname}: not a valid safetensors file ({e})") from e
        self._handles[fname] = handle
        self.files.append(fname)
        for name in handle.keys():
            if name in self._where:
                raise ConversionError(f"tensor {name} appears in both {self._where[name]} and {fname}")
            self._where[name] = fname

    def _from_pickle(self, first: str) -> None:
        if first.endswith(".json"):
            shards = sorted(set(self._weight_map(self.folder / first).values()))
            self.files.append(first)
        else:
            shards = [first]
        for fname in shards:
            path = self.folder / fname
            if "/" in fname or not path.is_file():
                raise ConversionError(f"weight file {fname} is missing from {self.folder}")
            try:
                # weights_only: the restricted unpickler that builds tensors and plain containers only.
                # mmap: tensors stay on disk until used (needs the zip format torch has saved since 1.6).
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or old files
                raise ConversionError(f"{fname}: torch.load(weights_only=True, mmap=True) refused it ({e})") from e
            if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise ConversionError(f"{fname}: expected a dict of tensors (a state dict)")
            self._pickled[fname] = sd
            self.files.append(fname)
            for name in sd:
                if name in self._where:
                    raise ConversionError(f"tensor {name} appears in both {self._where[name]} and {fname}")
                self._where[name] = fname

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        fname = self._where[name]
        if fname in self._pickled:
            return tuple(self._pickled[fname][name].shape)
        return tuple(self._handles[fname].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Source dtype as a short string ("BF16", "U8", ...) without reading the data."""
        fname = self._where[name]
        if fname in self._pickled:
            return str(self._pickled[fname][name].dtype).removeprefix("torch.").upper()
        return self._handles[fname].get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        fname = self._where[name]
        if fname in self._pickled:
            return self._pickled[fname][name]
        return self._handles[fname].get_tensor(name)

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()


# ---------------------------------------------------------------------------------------------------------------
# Source resolution
# ---------------------------------------------------------------------------------------------------------------
def _resolve(src: str, revision: str | None, allow_pickle: bool) -> tuple[Path, str, str | None]:
    """A local folder, or a hub id fetched with snapshot_download. Returns (folder, source, revision)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if revision is not None:
            raise ConversionError(f"--revision applies to hub ids, but {src} is a local folder")
        return path.resolve(), str(path.resolve()), None
    if path.exists():
        raise ConversionError(f"{src} is a file; give the model folder (or a hub id like org/name)")
    if not HUB_ID.match(src):
        raise ConversionError(f"{src}: no such folder, and not a hub id of the form org/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    def fetch(patterns) -> Path:
        try:
            return Path(snapshot_download(src, revision=revision, allow_patterns=list(patterns)))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
            # huggingface_hub's messages span lines (a hint, a URL): one line, as every error of the converter
            raise ConversionError(f"{src}: cannot fetch it from the hub ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())})") from e

    safetensors = ("model.safetensors.index.json", "model.safetensors")
    folder = fetch(_META_FILES + _SAFETENSORS_PATTERNS)
    if allow_pickle and not any((folder / f).is_file() for f in safetensors):
        # Only now the pickle: a repo with safetensors never needs it.
        folder = fetch(_META_FILES + _PICKLE_PATTERNS)
    # The snapshot folder is named by the commit hash it holds.
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, src, commit


def _sha256_files(folder: Path, names: list[str], progress: bool) -> dict[str, str]:
    """SHA-256 of each source file (for the provenance), with a byte progress bar."""
    from tqdm import tqdm

    out = {}
    total = sum((folder / n).stat().st_size for n in names)
    with tqdm(total=total, desc="hashing", unit="B", unit_scale=True, disable=not progress) as bar:
        for name in names:
            h = hashlib.sha256()
            with open(folder / name, "rb", buffering=0) as f:
                while chunk := f.read(16 << 20):
                    h.update(chunk)
                    bar.update(len(chunk))
            out[name] = h.hexdigest()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise ConversionError(f"{path.name}: cannot read it as JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path.name}: expected a JSON object")
    return data


def _int(cfg: dict, key: str, default=None) -> int:
    v = cfg.get(key)
    if v is None:  # absent or null: transformers' configs take their default for both
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConversionError(f"config.json: {key} must be a positive integer, found {v!r}")
    return v


def _positive_number(v) -> bool:
    """A finite number > 0 (a JSON integer past the float range, 10**400, is none: formats/config.py's as_float)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(as_float(v)) and v > 0


def _kv_default_note(cfg: dict, family: str, kv_heads: int) -> str:
    """For errors a defaulted num_key_value_heads causes: names the field and where its value came from."""
    if cfg.get("num_key_value_heads") is not None:
        return ""
    cls = "BitNetConfig" if family == "bitnet" else "LlamaConfig"
    how = "is null" if "num_key_value_heads" in cfg else "is absent"
    return f" (config.json's num_key_value_heads {how}: {kv_heads} is what transformers' {cls} then takes)"


def _detect_family(cfg: dict, names: set[str]) -> str:
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConversionError(f"config.json: architectures must be a list of class names, found {archs!r}")
    model_type = cfg.get("model_type")
    qc = cfg.get("quantization_config")
    bitnet_quant = isinstance(qc, dict) and qc.get("quant_method") == "bitnet"
    has = lambda frag: any(frag in n for n in names)
    if "BitNetForCausalLM" in archs or model_type == "bitnet":
        family = "bitnet"
    elif "BitnetForCausalLM" in archs:
        family = "1bitllm"
    elif bitnet_quant and ("LlamaForCausalLM" in archs or model_type == "llama"):
        family = "llama-bitnet"
    elif "LlamaForCausalLM" in archs or model_type == "llama":
        hint = (" Its tensors include inner_attn_ln/ffn_layernorm, like a 1bitLLM checkpoint: if it is one, its "
                "config.json should say architectures [\"BitnetForCausalLM\"]." if has("inner_attn_ln") else "")
        raise ConversionError(
            "config.json describes a plain Llama model (LlamaForCausalLM without quantization_config.quant_method "
            "\"bitnet\"), not a BitNet b1.58 checkpoint; refusing to guess (treating one as the other gives "
            f"garbage).{hint}")
    else:
        raise ConversionError(
            f"config.json: unsupported model (architectures {archs}, model_type {model_type!r}); supported: "
            "BitNetForCausalLM (model_type bitnet), BitnetForCausalLM (1bitLLM, model_type llama), and "
            "LlamaForCausalLM with quantization_config.quant_method \"bitnet\"")
    # The tensor names must agree with the family: the sub-norms are what sets them apart.
    if family == "bitnet" and has("inner_attn_ln"):
        raise ConversionError("config.json says BitNetForCausalLM but the tensors use 1bitLLM names (inner_attn_ln)")
    if family == "1bitllm" and has("attn_sub_norm"):
        raise ConversionError("config.json says BitnetForCausalLM (1bitLLM) but the tensors use Microsoft names "
                              "(attn_sub_norm)")
    if family == "llama-bitnet" and (has("inner_attn_ln") or has("attn_sub_norm")):
        raise ConversionError("config.json says LlamaForCausalLM, which has no sub-norms, but the tensors include "
                              "attention sub-norms: the architecture in config.json is wrong")
    return family


def _rope(cfg: dict, family: str, max_positions: int) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling, resolved exactly as transformers 5 resolves them.

    modeling_rope_utils.convert_rope_params_to_dict: a non-empty legacy ``rope_scaling`` replaces
    ``rope_parameters`` whole (``rope_scaling or rope_parameters``); the dict's own ``rope_theta`` wins, else the
    top-level key (even a null one), else the config class's ``default_theta``. standardize_rope_params: the type is
    ``rope_type``, else the v4 ``type``; a llama3 rope takes a top-level ``original_max_position_embeddings`` over the
    dict's (the llama3 rope computation standardizes again once config.json's extra keys are attributes), else the
    dict's, else ``max_position_embeddings``.
    The stored rope_scaling is the v4-style dict with "rope_type" (and without rope_theta), or null; what the
    runtime requires of it (factors, bounds) is checked with the whole config, by formats/config.py.
    """
    for key in ("rope_scaling", "rope_parameters"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ConversionError(f"config.json: {key} must be an object or null")
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    default_theta = 500000.0 if family == "bitnet" else 10000.0  # BitNetConfig / LlamaConfig.default_theta
    theta = params["rope_theta"] if "rope_theta" in params else cfg.get("rope_theta", default_theta)
    if "rope_theta" not in params and "rope_theta" not in cfg:
        log.info("config.json has no rope_theta; using the %s default %s", family, theta)
    if not _positive_number(theta):
        raise ConversionError(f"config.json: rope_theta must be a positive number, found {theta!r:.40}")
    # transformers' default rope rotates int(head_dim · partial_rotary_factor) dims of each head: another model
    partial = params["partial_rotary_factor"] if "partial_rotary_factor" in params else \
        cfg.get("partial_rotary_factor", 1.0)
    if isinstance(partial, bool) or partial != 1.0:
        raise ConversionError(f"config.json: partial_rotary_factor {partial!r}: rotary embeddings over part of each "
                              "head are not supported")
    kind = params["rope_type"] if "rope_type" in params else params.get("type", "default")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if kind == "default":
        if extra:
            raise ConversionError(f"config.json: rope type 'default' with the parameters {extra} is not supported")
        return float(theta), None
    if kind not in SUPPORTED_ROPE_SCALING:
        raise ConversionError(f"config.json: rope scaling type {kind!r} is not supported (supported: none, "
                              f"{', '.join(SUPPORTED_ROPE_SCALING)})")
    scaling = {"rope_type": kind, **{k: params[k] for k in extra}}
    if kind == "llama3":
        if "original_max_position_embeddings" in cfg:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_positions)
    return float(theta), scaling


def _ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConversionError(f"{where}: eos_token_id must be an integer or a list of integers, found {value!r}")
    return values


def _model_config(cfg: dict, family: str, gen: dict, tok_facts: dict) -> dict:
    """The PACKED.md §3 config dict."""
    qc = cfg.get("quantization_config")
    if qc is not None:
        if not isinstance(qc, dict) or qc.get("quant_method") != "bitnet":
            raise ConversionError(f"config.json: quantization_config {qc!r} is not a bitnet one")
        for key, values in (("linear_class", ("bitlinear", "autobitlinear")),
                            ("quantization_mode", ("offline", "online"))):
            # what transformers' BitNetQuantConfig accepts; another linear_class would be read as "bitlinear" (its
            # weight_scale divides), inverting every scale of an "autobitlinear" checkpoint
            if qc.get(key, values[0]) not in values:
                raise ConversionError(f"config.json: quantization_config.{key} {qc[key]!r} is not one of "
                                      f"{', '.join(values)}")
        if qc.get("use_rms_norm"):
            raise ConversionError("config.json: quantization_config.use_rms_norm is true (an RMSNorm inside every "
                                  "BitLinear); format v1 does not support it")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConversionError(f"config.json: {key} is true; BitNet linears have no bias and format v1 has none")

    default_act = "relu2" if family == "bitnet" else "silu"
    act = cfg.get("hidden_act", default_act)
    if act not in ("relu2", "silu"):
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported (relu2 or silu)")
    if family != "bitnet" and act != "silu":
        raise ConversionError(f"config.json: hidden_act {act!r}, but the {family} family uses silu")

    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads")
    # Each config class's own default: BitNetConfig's field defaults to 5 (2B-4T's) when the key is absent and only
    # a null means num_attention_heads; LlamaConfig takes num_attention_heads for both.
    kv_default = 5 if family == "bitnet" and "num_key_value_heads" not in cfg else heads
    kv_heads = _int(cfg, "num_key_value_heads", kv_default)
    if heads % kv_heads:
        raise ConversionError(f"config.json: num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}{_kv_default_note(cfg, family, kv_heads)}")
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConversionError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = _int(cfg, "head_dim", hidden // heads)
    if head_dim % 2:
        raise ConversionError(f"config.json: head_dim {head_dim} is odd; rotate-half rope needs an even one")
    max_positions = _int(cfg, "max_position_embeddings", 2048)  # both config classes' default
    theta, scaling = _rope(cfg, family, max_positions)
    eps = cfg.get("rms_norm_eps", 1e-5 if family == "bitnet" else 1e-6)
    if not _positive_number(eps):
        raise ConversionError(f"config.json: rms_norm_eps must be a positive number, found {eps!r:.40}")
    vocab = _int(cfg, "vocab_size")
    if tok_facts["vocab_size"] > vocab:
        raise ConversionError(f"the tokenizer has token id {tok_facts['vocab_size'] - 1} but config.json "
                              f"vocab_size is {vocab}: ids past the embedding")
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConversionError(f"config.json: tie_word_embeddings must be true or false, found {tie!r}")

    # config.json's, else the tokenizer's, else generation_config's; a null is absent
    candidates = (cfg.get("bos_token_id"), tok_facts["bos_token_id"], gen.get("bos_token_id"))
    bos = next((v for v in candidates if v is not None), None)
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int)):
        raise ConversionError(f"config.json: bos_token_id must be an integer, found {bos!r}")
    # Every id that ends generation: the model config's, generation_config's (often a list: 2B-4T's chat turns
    # end at <|eot_id|>) and the tokenizer's eos token, in that order.
    eos: list[int] = []
    for v in (_ids(cfg.get("eos_token_id"), "config.json") + _ids(gen.get("eos_token_id"), "generation_config.json")
              + _ids(tok_facts["eos_token_id"], "tokenizer")):
        if v not in eos:
            eos.append(v)
    bad = [v for v in eos + ([bos] if bos is not None else []) if v >= vocab]
    if bad:
        raise ConversionError(f"bos/eos token ids {bad} are outside the vocabulary ({vocab})")
    if not eos:
        log.warning("no eos_token_id in config.json, generation_config.json or the tokenizer")

    config = {
        "family": family,
        "hidden_size": hidden,
        "intermediate_size": _int(cfg, "intermediate_size"),
        "num_hidden_layers": _int(cfg, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "rope_theta": theta,
        "rope_style": "neox",
        "rope_scaling": scaling,
        "rms_norm_eps": float(eps),
        "hidden_act": act,
        "sub_norms": family != "llama-bitnet",
        "tie_word_embeddings": tie,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    # The runtime's validation (formats/config.py: bounds, the rope_scaling it implements), here before any weight
    # is read; PackedWriter checks again what any writer writes.
    try:
        ModelConfig.from_dict(config)
    except ConfigError as e:
        raise ConversionError(f"config.json: {str(e).removeprefix('model config: ')}") from e
    return config


# ---------------------------------------------------------------------------------------------------------------
# The source
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class HFSource:
    """A resolved HF checkpoint, checked and mapped, ready to stream canonical tensors.

    ``tensors()`` yields CanonicalTensor(name, kind, load) in file order; ``shapes[name]`` is the logical shape.
    Use as a context manager (or call ``close()``) to release the weight files.
    """

    folder: Path
    source: str
    revision: str | None
    family: str
    form: str
    config: dict
    tokenizer: dict
    files: list[str]
    shapes: dict[str, tuple[int, ...]]
    kinds: dict[str, str]
    skipped: dict[str, str]
    _plan: dict[str, tuple] = field(repr=False)
    _weights: _WeightFiles = field(repr=False)
    source_dtype: str | None = None
    kept_scaled_ternary: int = 0

    def tensors(self) -> Iterator[CanonicalTensor]:
        for name, kind in self.kinds.items():
            yield CanonicalTensor(name, kind, lambda name=name: self._load(name))

    def _load(self, name: str):
        how = self._plan[name]
        if how[0] == "float":
            return self._weights.get(how[1])
        if how[0] == "latent":
            return self._ternarize(name, self._weights.get(how[1]))
        packed, scale = self._packed(name, *how[1:])
        return ternary.unpack_hf(packed), scale

    def t2(self, name: str) -> tuple[torch.Tensor, float]:
        """A linear weight as t2 bytes: (uint8 [out, ceil(in/4)], scale) with W = scale · t.

        HF-packed weights are transcoded byte to byte (``hf_to_t2``), never unpacked to one int8 per weight.
        """
        how = self._plan[name]
        if how[0] == "packed":
            packed, scale = self._packed(name, *how[1:])
            return ternary.hf_to_t2(packed), scale
        t, scale = self._load(name)
        return ternary.pack_t2(t), scale

    def _ternarize(self, name: str, w: torch.Tensor):
        # float8 is a float dtype but torch's reductions (aminmax, abs().mean()) do not implement it: refused, as no
        # BitNet checkpoint stores its latents so (the 1-byte floats are float8 variants)
        if not torch.is_floating_point(w) or w.dtype.itemsize == 1:
            raise ConversionError(f"{name}: expected a float latent weight, found {w.dtype} (supported: bf16, f16, "
                                  "f32, f64)")
        if not _all_finite(w):
            raise ConversionError(f"{name}: the latent weight holds inf or NaN")
        # A c · t tensor has one non-zero magnitude: two different ones among the first 4096 values rule it out
        # cheaply (real latent weights), before the exact full check.
        head = w.reshape(-1)[:4096].abs()
        head = head[head != 0]
        maybe = head.numel() == 0 or bool((head == head[0]).all())
        c = ternary.scaled_ternary_scale(w) if maybe else None
        if c is not None:
            # Already c · t (a fake-quantized export): keep c; absmean would shrink it to c · (fraction non-zero).
            self.kept_scaled_ternary += 1
            return torch.sign(w).to(torch.int8), float(torch.tensor(c, dtype=torch.float32))
        t, m = ternary.absmean_ternarize(w)
        return t, m

    def _packed(self, name: str, wname: str, sname: str, divides: bool) -> tuple[torch.Tensor, float]:
        """The HF-packed uint8 [out/4, in] weight, checked, and its scale as a multiplier."""
        packed = self._weights.get(wname)
        ws = self._weights.get(sname)
        if ws.numel() != 1:
            raise ConversionError(f"{sname}: expected one scale per tensor, found shape {tuple(ws.shape)}")
        ws32 = ws.reshape(1).to(torch.float32)
        # bitlinear stores the divisor 1/mean|W|; we store the multiplier, computed in f32.
        scale = float((1.0 / ws32) if divides else ws32)
        if not (math.isfinite(scale) and scale > 0):
            raise ConversionError(f"{sname}: the scale must be finite and > 0, found {float(ws32)}")
        p = packed.numpy()
        # Code 3 (both bits of a field set) is unused: a byte holding one is not a packed ternary weight.
        if np.bitwise_and(p & (p >> 1), 0x55).any():
            raise ConversionError(f"{wname}: holds the unused 2-bit code 3, so it is not a packed ternary weight")
        return packed, scale

    def close(self) -> None:
        self._weights.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _expand(template: str, n_layers: int) -> list[tuple[str, int | None]]:
    if "{i}" not in template:
        return [(template, None)]
    return [(template.format(i=i), i) for i in range(n_layers)]


def load_hf_source(src: str, revision: str | None = None, allow_pickle: bool = False) -> HFSource:
    """Resolve ``src`` (folder or hub id), detect the family, check every tensor and map it to its canonical name.

    Raises ConversionError naming the problem. Nothing is written.
    """
    folder, source, commit = _resolve(src, revision, allow_pickle)
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds GGUF files ({', '.join(ggufs)}): use bitnet-convert gguf-to-packed FILE" if ggufs else ""
        raise ConversionError(f"{source}: no config.json{hint}")
    cfg = _read_json(folder / "config.json")
    gen = _read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    weights = _WeightFiles(folder, allow_pickle)
    try:
        return _build_source(folder, source, commit, cfg, gen, weights)
    except BaseException:
        weights.close()
        raise


# transformers' quantizers_utils.should_convert_module (5.x): an entry matches a module name from its start up to a
# module boundary, as a regex with the same boundary, or as a suffix of the name.
_MODULE_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def _not_converted(module: str, patterns: list[str]) -> bool:
    return any(re.match(rf"(?:{p}){_MODULE_BOUNDARY}", module) or module.endswith(p) for p in patterns)


def _check_modules_to_not_convert(qc: dict | None, family: str, n_layers: int) -> None:
    """Refuses a quantization_config.modules_to_not_convert under which transformers would not run the model we write.

    transformers replaces every nn.Linear by a BitLinear unless an entry matches its module name; with the list null
    or absent it skips what get_keys_to_not_convert finds (the output embedding, tied weights, the last parameter:
    lm_head, never a layer linear). Format v1 has ternary layer linears and a float head only, so an explicit list
    must match lm_head and no layer linear.
    """
    patterns = (qc or {}).get("modules_to_not_convert")
    if patterns is None:
        return
    key = "config.json: quantization_config.modules_to_not_convert"
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise ConversionError(f"{key} must be a list of module names, found {patterns!r}")
    linears = [t[: -len(".weight")].format(i=i) for t, _, kind in NAME_MAPS[family] if kind == "linear"
               for i in range(n_layers)]
    try:
        kept = [m for m in linears if _not_converted(m, patterns)]
        head_kept = _not_converted("lm_head", patterns)
    except re.error as e:
        raise ConversionError(f"{key} {patterns!r}: not valid regular expressions ({e})") from e
    if kept or not head_kept:
        found = f"keeps {', '.join(kept[:3])}{', ...' if len(kept) > 3 else ''} unquantized" if kept else \
            "ternarizes lm_head"
        raise ConversionError(f"{key} {patterns!r}: transformers then {found}; format v1 needs every layer linear "
                              "ternary and lm_head float (list lm_head and no layer linear, or leave it null)")


def _drop_added_tokens_past(tokenizer: dict, facts: dict, rows) -> tuple[dict, dict]:
    """The tokenizer without the added tokens whose ids are past the embedding's ``rows`` (and facts to match).

    transformers appends a named special token the vocabulary lacks (tokenizer_config.json's pad_token "<pad>") at
    id len(vocab), past the embedding: it loads such a model, whose embedding has no row for the token. The runtime
    refuses a tokenizer with an id past its embedding (it would index past it mid-generation), so such tokens (only
    ones that exist solely as added tokens, never BOS/EOS) are dropped, with a warning, and the model converts.
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or facts["vocab_size"] <= rows:
        return tokenizer, facts  # (a bad vocab_size is _model_config's to report)
    from tokenizers import Tokenizer

    data = json.loads(tokenizer["tokenizer_json"])
    model_ids = set(Tokenizer.from_str(tokenizer["tokenizer_json"]).get_vocab(with_added_tokens=False).values())
    keep = (facts["bos_token_id"], facts["eos_token_id"])
    dropped = [t for t in data.get("added_tokens", []) if t["id"] >= rows and t["id"] not in model_ids
               and t["id"] not in keep]
    if not dropped:
        return tokenizer, facts
    data["added_tokens"] = [t for t in data["added_tokens"] if t not in dropped]
    tok = Tokenizer.from_str(json.dumps(data))
    names = [t["content"] for t in dropped]
    log.warning("dropping the tokenizer's added token(s) %s: id(s) %s are past the embedding's %d rows (transformers "
                "appends a special token the vocabulary lacks there; the model has no row for it)",
                ", ".join(names), ", ".join(str(t["id"]) for t in dropped), rows)
    special = {k: v for k, v in tokenizer.get("special_tokens", {}).items() if v not in names}
    return ({**tokenizer, "tokenizer_json": tok.to_str(), "special_tokens": special},
            {**facts, "vocab_size": embedding_rows(tok)})


def _same_tensor(weights: _WeightFiles, a: str, b: str) -> bool:
    """torch.equal, as transformers compares two stored tied weights (in a common dtype)."""
    if weights.shape(a) != weights.shape(b):
        return False
    x, y = weights.get(a), weights.get(b)
    dtype = torch.promote_types(x.dtype, y.dtype)
    return torch.equal(x.to(dtype), y.to(dtype))


def _build_source(folder, source, commit, cfg, gen, weights: _WeightFiles) -> HFSource:
    names = set(weights.names())
    family = _detect_family(cfg, names)
    try:
        tokenizer, tok_files, tok_facts = normalize_tokenizer(folder)
    except TokenizerError as e:
        raise ConversionError(str(e)) from e
    tokenizer, tok_facts = _drop_added_tokens_past(tokenizer, tok_facts, cfg.get("vocab_size"))
    config = _model_config(cfg, family, gen, tok_facts)
    if config["num_hidden_layers"] > len(names):  # a layer is 9 tensors or more: a lying count must not size the plan
        held = {m[1] for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))}
        raise ConversionError(f"config.json: num_hidden_layers is {config['num_hidden_layers']}, but the checkpoint "
                              f"holds tensors of {len(held)} layers")
    _check_modules_to_not_convert(cfg.get("quantization_config"), family, config["num_hidden_layers"])
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if config["tie_word_embeddings"] and {head, embed} <= names and not _same_tensor(weights, head, embed):
        # transformers 5 ties the head to the embedding only when the checkpoint stores no other one
        # (PreTrainedModel.tie_weights: both stored and not equal -> a warning and no tie): it runs the stored head,
        # so that is kept, as an untied head. (Both are read only for a tied checkpoint that stores a head.)
        log.warning("tie_word_embeddings is true but the stored lm_head.weight differs from the embedding; keeping "
                    "it as an untied head, as transformers does")
        config["tie_word_embeddings"] = False
    expected = {n: ("linear" if ternary_ else "float", shape) for n, (shape, ternary_) in model_tensors(config).items()}
    qc = cfg.get("quantization_config") or {}
    # transformers' default linear_class is "bitlinear" (weight_scale divides).
    divides = qc.get("linear_class", "bitlinear") != "autobitlinear"

    biases = sorted(n for n in names if n.endswith(".bias"))
    if biases:
        raise ConversionError(f"the checkpoint has bias tensors ({', '.join(biases[:5])}"
                              f"{', ...' if len(biases) > 5 else ''}); BitNet linears have none and format v1 "
                              "cannot store them")

    consumed: set[str] = set()
    skipped: dict[str, str] = {}
    plan: dict[str, tuple] = {}
    forms: set[str] = set()
    n_layers = config["num_hidden_layers"]
    for hf_t, canon_t, kind in _GLOBAL_MAP + NAME_MAPS[family]:
        for hf_name, i in _expand(hf_t, n_layers):
            canon = canon_t.format(i=i) if i is not None else canon_t
            if canon not in expected:
                # Only the untied head can be absent from the plan: a tied checkpoint may still store it.
                if hf_name in names:
                    skipped[hf_name] = ("tie_word_embeddings is true and it equals the embedding: the head is "
                                        "embed.weight")
                continue
            if hf_name not in names:
                raise ConversionError(f"tensor {hf_name} (for {canon}) is missing from the checkpoint")
            shape, dtype = weights.shape(hf_name), weights.dtype(hf_name)
            want = expected[canon][1]
            consumed.add(hf_name)
            # k/v widths come from num_key_value_heads: name it when it was defaulted
            kv_note = _kv_default_note(cfg, family, config["num_key_value_heads"]) if re.search(
                r"\.[kv]_proj\.weight$", hf_name) else ""
            if kind == "float":
                if dtype not in ("BF16", "F16", "F32", "BFLOAT16", "FLOAT16", "FLOAT32", "F64", "FLOAT64"):
                    raise ConversionError(f"{hf_name}: expected a float tensor, found {dtype}")
                if shape != want:
                    raise ConversionError(f"{hf_name}: shape {shape}, expected {want} from config.json")
                plan[canon] = ("float", hf_name)
                continue
            scale_name = hf_name[: -len("weight")] + "weight_scale"
            if dtype in ("U8", "UINT8"):
                out_f, in_f = want
                if out_f % 4 or shape != (out_f // 4, in_f):
                    raise ConversionError(f"{hf_name}: packed shape {shape}, expected {(out_f // 4, in_f)} "
                                          f"(uint8 [out/4, in] for {want}){kv_note}")
                if scale_name not in names:
                    raise ConversionError(f"{hf_name} is packed (uint8) but {scale_name} is missing")
                if not qc:
                    raise ConversionError(f"{hf_name} is packed but config.json has no quantization_config saying "
                                          "whether weight_scale multiplies or divides (linear_class)")
                consumed.add(scale_name)
                plan[canon] = ("packed", hf_name, scale_name, divides)
                forms.add("packed")
            else:
                if shape != want:
                    raise ConversionError(f"{hf_name}: shape {shape}, expected {want} from config.json{kv_note}")
                if scale_name in names:
                    raise ConversionError(f"{hf_name} is a float weight but {scale_name} exists: a float weight "
                                          "with an offline scale is not a form this converter knows")
                plan[canon] = ("latent", hf_name)
                forms.add("latent")

    for n in sorted(names - consumed - set(skipped)):
        for pattern, reason in SKIPPED:
            if pattern.match(n):
                skipped[n] = reason
    unexpected = sorted(names - consumed - set(skipped))
    if unexpected:
        raise ConversionError(f"{len(unexpected)} unexpected tensor(s) in the checkpoint: "
                              f"{', '.join(unexpected[:10])}{', ...' if len(unexpected) > 10 else ''}")
    for n, reason in skipped.items():
        log.info("skipping %s: %s", n, reason)

    form = forms.pop() if len(forms) == 1 else "mixed"
    log.info("family %s, %s linear weights, %d tensors", family, form, len(plan))
    return HFSource(folder=folder, source=source, revision=commit, family=family, form=form, config=config,
                    tokenizer=tokenizer,
                    files=["config.json"] + (["generation_config.json"] if gen else []) + tok_files + weights.files,
                    shapes={k: v[1] for k, v in expected.items()}, kinds={k: v[0] for k, v in expected.items()},
                    skipped=skipped, _plan=plan, _weights=weights,
                    source_dtype=cfg.get("dtype", cfg.get("torch_dtype")))


# ---------------------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------------------
def _all_finite(x: torch.Tensor) -> bool:
    """min and max are NaN if any element is NaN (torch reductions propagate it), inf if any is ±inf.

    One reduction pass and no temporaries: torch.isfinite on a 2B-4T bf16 embedding takes seconds and 330 MB.
    """
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _specs(hf: HFSource, dtype: str) -> list[TensorSpec]:
    specs = []
    for name, kind in hf.kinds.items():
        shape = hf.shapes[name]
        if kind == "linear":
            specs.append(TensorSpec(name, "t2", shape, scale=name + "_scale", scale_granularity="tensor"))
            specs.append(TensorSpec(name + "_scale", "f32", (1,)))
        else:
            specs.append(TensorSpec(name, dtype, shape))
    return specs


def convert_hf(src: str, out: str, *, revision: str | None = None, dtype: str = "bf16", force: bool = False,
               allow_pickle: bool = False, progress: bool = True) -> ConversionSummary:
    """Convert a HF BitNet b1.58 checkpoint (folder or hub id) into one packed file at ``out``.

    Float tensors (embeddings, norms, an untied head) are stored as ``dtype`` ("bf16", "f16" or "f32").
    The file is written beside ``out`` and renamed when complete; an existing ``out`` is kept unless ``force``.
    """
    from tqdm import tqdm

    if dtype not in FLOAT_DTYPES:
        raise ConversionError(f"dtype {dtype!r}: choose one of {', '.join(FLOAT_DTYPES)}")
    out_path = Path(out)
    if out_path.is_dir():
        raise ConversionError(f"{out} is a folder; give a file name")
    if (error := output_folder_error(out_path)) is not None:
        raise ConversionError(f"{out}: {error.strerror}")
    if out_path.exists() and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    start = time.perf_counter()
    with load_hf_source(src, revision=revision, allow_pickle=allow_pickle) as hf:
        refuse_source_as_output(out_path, [Path(hf.folder) / f for f in hf.files], ConversionError)
        files = _sha256_files(hf.folder, hf.files, progress)
        provenance = {
            "source": hf.source,
            "revision": hf.revision,
            "files": files,
            "converter": converter_version(),
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            # The dtype config.json declares (v5 "dtype", v4 "torch_dtype"); informational.
            "source_dtype": hf.source_dtype,
        }
        torch_dtype = FLOAT_DTYPES[dtype]
        n_params = n_ternary = t2_bytes = n_tensors = 0
        with PackedWriter(out_path, config=hf.config, tokenizer=hf.tokenizer, provenance=provenance,
                          tensors=_specs(hf, dtype), overwrite=force) as writer:
            for name, kind, load in tqdm(list(hf.tensors()), desc="converting", unit="tensor", disable=not progress):
                if kind == "linear":
                    packed, scale = hf.t2(name)
                    writer.write(name, packed)
                    writer.write(name + "_scale", torch.tensor([scale], dtype=torch.float32))
                    n_ternary += math.prod(hf.shapes[name])
                    t2_bytes += packed.numel() + 4
                    n_tensors += 2
                else:
                    x = load().to(torch_dtype).contiguous()
                    if not _all_finite(x):
                        raise ConversionError(f"{name}: not finite after conversion to {dtype} "
                                              "(out of range? try --dtype f32 or bf16)")
                    writer.write(name, x)
                    n_tensors += 1
                n_params += math.prod(hf.shapes[name])
            kept = hf.kept_scaled_ternary
        summary = ConversionSummary(
            out=str(out_path), family=hf.family, form=hf.form, tensors=n_tensors, parameters=n_params,
            ternary_weights=n_ternary, bits_per_ternary_weight=(t2_bytes * 8 / n_ternary) if n_ternary else 0.0,
            file_size=os.path.getsize(out_path), seconds=time.perf_counter() - start, kept_scaled_ternary=kept)
    log.info("wrote %s: %d tensors, %.1f MB", out_path, n_tensors, summary.file_size / 1e6)
    return summary
