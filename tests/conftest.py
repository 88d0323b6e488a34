"""Shared tiny-model fixtures: tokenizers trained here and tiny HF BitNet checkpoints of every family.

Nothing comes from the hub. Everything is tiny (hidden 64, intermediate 160, 2 layers, 4 heads / 2 kv heads,
vocab = the tokenizer's size) so that tests run in seconds on 2 CPU cores.

Factories (plain functions, reachable through the ``tiny`` fixture, e.g. ``tiny.microsoft_packed(tmp_path)``):

- ``bpe_tokenizer(folder, chat_template=CHAT_TEMPLATE) -> Path``: a byte-level BPE tokenizer (Llama-3 style
  specials ``<|begin_of_text|>`` (bos), ``<|end_of_text|>`` (eos), ``<|eot_id|>``; a TemplateProcessing
  post-processor that prepends BOS), written as tokenizer.json + tokenizer_config.json (with the chat template).
- ``sentencepiece_tokenizer(folder) -> Path``: a SentencePiece BPE ``tokenizer.model`` (``<unk>``/``<s>``/``</s>``
  = 0/1/2, byte fallback) + a LlamaTokenizer tokenizer_config.json with add_bos_token (the 1bitLLM setup).
- ``microsoft_latent(folder, tie=True, seed=0) -> TinyCheckpoint``: transformers ``BitNetForCausalLM`` random init,
  saved in bf16 with save_pretrained, config.json given ``quantization_config`` autobitlinear/online so that
  transformers quantizes online (a reference for the ternarized file).
- ``microsoft_packed(folder, linear_class="autobitlinear"|"bitlinear", tie=True, seed=0) -> TinyCheckpoint``:
  the same model, linears packed with transformers' own ``pack_weights`` + bf16 ``weight_scale`` (mean|W| for
  autobitlinear, 1/mean|W| for bitlinear), quantization_mode offline. Loads in transformers' BitNetForCausalLM.
- ``onebitllm(folder, seed=0, tokenizer="sentencepiece"|"bpe", inv_freq=True) -> TinyCheckpoint``: hand-written
  1bitLLM config (BitnetForCausalLM, model_type llama, silu, rope 10000, tied) + fp16 latent safetensors with
  ``inner_attn_ln``/``ffn_layernorm`` (and rotary inv_freq buffers, which the converter must skip).
- ``llama_bitnet(folder, linear_class="bitlinear", seed=0) -> TinyCheckpoint``: LlamaForCausalLM config +
  quantization_config bitnet (offline), packed linears, untied lm_head, BPE tokenizer.
- ``offline_hub_cache(files, repo_id, sha, tmp_path, monkeypatch)``: a huggingface_hub cache holding a folder's
  files as ``repo_id``@``sha``, with the hub set offline (hub ids resolve without a network).
- ``rewrite_packed(src, dst, edit=None, extra=(), config=None, tokenizer=None)``: a copy of packed file ``src`` at
  ``dst``, each entry passed through ``edit(spec, tensor) -> (spec, tensor) | None`` (a TensorSpec; None drops it),
  ``extra`` (spec, tensor) pairs appended and the config's and tokenizer's keys updated from ``config`` and
  ``tokenizer``: files that the packed format takes but whose contents a test wants changed.
- ``onebitllm_as_transformers(ckpt, folder) -> Path``: the 1bitLLM checkpoint rewritten as a transformers
  BitNetForCausalLM folder (silu, rope 10000, tied, autobitlinear online, sub-norm keys renamed), which is an
  exact transformers reference for the 1bitLLM family (REFERENCE.md §4).

``TinyCheckpoint`` has ``path`` (the folder), ``family``, ``form`` ("latent"/"packed"), ``config`` (config.json as
written), ``latent`` (canonical linear name -> latent float weight, latent forms) and ``ternary`` (canonical linear
name -> (t int8 [out, in], scale float) with W = scale · t, packed forms).

Session fixtures built once: ``bpe_tokenizer_dir``, ``sp_tokenizer_dir``, ``ms_latent``, ``ms_packed_auto``,
``ms_packed_bitlinear``, ``onebitllm_ckpt``, ``llama_bitnet_ckpt`` (treat them as read-only; copy to modify).
Load transformers models with TORCHDYNAMO_DISABLE=1 set (done here) to skip torch.compile.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

# transformers' BitNet code is decorated with torch.compile; eager is much faster for tiny models.
# Set before torch is imported, which reads it.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# tests never touch the hub: huggingface_hub answers from its cache or fails at once (read at its import)
os.environ["HF_HUB_OFFLINE"] = "1"
# bitnet-run points torch.compile's cache at the user's cache folder unless TORCHINDUCTOR_CACHE_DIR is set; the CLI
# tests keep torch's own default instead of writing to ~/.cache (test_runtime.py's test of that sets it apart)
_INDUCTOR_DEFAULT = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _INDUCTOR_DEFAULT)

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA every Triton kernel runs in Triton's CPU interpreter. Triton reads the switch when a @triton.jit
# function is defined, its own standard library's included (tl.max's index reduction), and importing transformers
# imports Triton (through torch._inductor). So it is set here, before any test module imports either; set in a test
# module it came too late whenever an earlier one had imported transformers, and an interpreted kernel then failed
# with "Cannot call @triton.jit'd outside of the scope of a kernel" (pytest tests/test_ternary.py
# tests/test_fast_default.py). Importing torch does not import Triton.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 160, 2, 4, 2

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
# A 2B-4T style chat template ("User: ...<|eot_id|>Assistant: ").
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}System: {{ m['content'] }}<|eot_id|>"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}<|eot_id|>"
    "{% else %}Assistant: {{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)
TRAIN_TEXT = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "BitNet b1.58 uses ternary weights {-1, 0, +1} and 8-bit activations.",
    "Ünïcödé tëxt: naïve café, 日本語のテキスト, emoji 🙂 and more.",
    "User: hi there<|eot_id|>Assistant: hello, how are you today?",
    "Numbers 0123456789, punctuation ()[]{}<>?!.,;: and tabs\tand\nnew lines.",
] * 20
# Strings the tokenizer round-trip tests encode (unicode, specials in text, spaces).
ENCODE_SAMPLES = [
    "Hello world",
    "  leading and trailing spaces  ",
    "naïve café 🙂 日本語",
    f"User: hi{EOT}Assistant: ",
    "a\nb\tc",
    "",
]


@dataclass
class TinyCheckpoint:
    path: Path
    family: str
    form: str
    config: dict
    latent: dict[str, torch.Tensor] = field(default_factory=dict)
    ternary: dict[str, tuple[torch.Tensor, float]] = field(default_factory=dict)


# --- tokenizers -------------------------------------------------------------------------------------------------
def bpe_tokenizer(folder, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Byte-level BPE (~300 tokens) with Llama-3 style specials and a BOS-adding post-processor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[BOS, EOS, EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
           "model_max_length": 4096, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def sentencepiece_tokenizer(folder) -> Path:
    """SentencePiece BPE tokenizer.model (400 pieces, <unk>/<s>/</s> = 0/1/2) + LlamaTokenizer config."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def _vocab_size(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(folder)))


# --- weights helpers --------------------------------------------------------------------------------------------
_LINEARS = {  # HF suffix -> canonical suffix
    "self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj", "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def _hf_linear_names():
    for i in range(LAYERS):
        for hf, canon in _LINEARS.items():
            yield f"model.layers.{i}.{hf}.weight", f"layers.{i}.{canon}.weight"


def _absmean(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The reference ternarization, written out here (independent of formats.ternary)."""
    w = w.float()
    m = w.abs().mean().clamp(min=1e-5)
    return torch.round(w / m).clamp(-1, 1).to(torch.int8), float(m)


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    # Norm weights default to ones, which would hide a swapped or dropped norm: make each one distinct.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))


def _pack_into(folder: Path, config_update: dict, linear_class: str, ckpt: TinyCheckpoint) -> None:
    """Replace model.safetensors' float linears by transformers-packed ones + weight_scale (bf16, like HF)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    state = load_file(str(folder / "model.safetensors"))
    for hf_name, canon in _hf_linear_names():
        t, m = _absmean(state[hf_name])
        ws = torch.tensor([m if linear_class == "autobitlinear" else 1.0 / m], dtype=torch.bfloat16)
        # What the converter must produce from the bf16 weight_scale: it multiplies, or 1/ws in f32.
        ws32 = ws.float()
        scale = float(ws32) if linear_class == "autobitlinear" else float(1.0 / ws32)
        state[hf_name] = pack_weights(t.clone())  # pack_weights adds 1 in place: hand it a copy
        state[hf_name[: -len("weight")] + "weight_scale"] = ws
        ckpt.ternary[canon] = (t, scale)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config_update)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    ckpt.config = cfg


def _latents_from_file(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    return {canon: state[hf] for hf, canon in _hf_linear_names()}


# --- checkpoint factories ---------------------------------------------------------------------------------------
def _microsoft_model(folder: Path, tie: bool, seed: int):
    from transformers import BitNetConfig, BitNetForCausalLM

    bpe_tokenizer(folder)
    vocab = _vocab_size(folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    cfg = BitNetConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       max_position_embeddings=256, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                       tie_word_embeddings=tie)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(cfg)
    _randomize_norms(model, gen)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(folder))
    # Chat turns end at <|eot_id|>, as in 2B-4T's generation_config.json.
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOS], ids[EOT]]}))
    return model


def microsoft_latent(folder, tie: bool = True, seed: int = 0) -> TinyCheckpoint:
    """Microsoft 2B-4T style, latent bf16 masters (like microsoft/bitnet-b1.58-2B-4T-bf16)."""
    folder = Path(folder)
    _microsoft_model(folder, tie, seed)
    cfg = json.loads((folder / "config.json").read_text())
    # Online autobitlinear: transformers ternarizes the masters at run time, so it is a quantized reference.
    cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                  "quantization_mode": "online"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return TinyCheckpoint(folder, "bitnet", "latent", cfg, latent=_latents_from_file(folder))


def microsoft_packed(folder, linear_class: str = "autobitlinear", tie: bool = True, seed: int = 0) -> TinyCheckpoint:
    """Microsoft 2B-4T style, packed uint8 [out/4, in] + weight_scale (offline), like microsoft/bitnet-b1.58-2B-4T."""
    folder = Path(folder)
    _microsoft_model(folder, tie, seed)
    ckpt = TinyCheckpoint(folder, "bitnet", "packed", {})
    # save_pretrained of an offline autobitlinear model raises, so the packed safetensors are written here.
    _pack_into(folder, {"quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                                "quantization_mode": "offline"}}, linear_class, ckpt)
    return ckpt


def onebitllm(folder, seed: int = 0, tokenizer: str = "sentencepiece", inv_freq: bool = True) -> TinyCheckpoint:
    """1bitLLM style: BitnetForCausalLM / model_type llama, silu, sub-norms inner_attn_ln + ffn_layernorm, fp16."""
    from safetensors.torch import save_file

    folder = Path(folder)
    (sentencepiece_tokenizer if tokenizer == "sentencepiece" else bpe_tokenizer)(folder)
    vocab = _vocab_size(folder)
    bos, eos = (1, 2) if tokenizer == "sentencepiece" else (0, 1)
    cfg = {
        "architectures": ["BitnetForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu",
        "hidden_size": HIDDEN, "initializer_range": 0.02, "input_bits": 8, "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 256, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float16", "use_cache": True,
        "vocab_size": vocab, "weight_bits": 1,
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.02: (std * torch.randn(shape, generator=gen)).to(torch.float16)
    hd = HIDDEN // HEADS
    state = {"model.embed_tokens.weight": rnd(vocab, HIDDEN, std=1.0), "model.norm.weight": 1 + rnd(HIDDEN, std=0.2)}
    shapes = {"self_attn.q_proj": (HEADS * hd, HIDDEN), "self_attn.k_proj": (KV_HEADS * hd, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * hd, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * hd),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name, shape in shapes.items():
            state[p + name + ".weight"] = rnd(*shape)
        state[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN, std=0.2)
        state[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN, std=0.2)
        state[p + "self_attn.inner_attn_ln.weight"] = 1 + rnd(HEADS * hd, std=0.2)
        state[p + "mlp.ffn_layernorm.weight"] = 1 + rnd(INTERMEDIATE, std=0.2)
        if inv_freq:
            state[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return TinyCheckpoint(folder, "1bitllm", "latent", cfg, latent=_latents_from_file(folder))


def onebitllm_as_transformers(ckpt: TinyCheckpoint, folder) -> Path:
    """Rewrite a 1bitLLM checkpoint as a transformers BitNetForCausalLM folder (an exact reference, REFERENCE §4)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in ckpt.path.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)
    state = load_file(str(ckpt.path / "model.safetensors"))
    renamed = {k.replace("inner_attn_ln", "attn_sub_norm").replace("ffn_layernorm", "ffn_sub_norm"): v
               for k, v in state.items() if not k.endswith("inv_freq")}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
    c = ckpt.config
    cfg = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "silu",
        "rope_theta": c["rope_theta"], "tie_word_embeddings": True, "dtype": "float16",
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "online"},
        **{k: c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                             "bos_token_id", "eos_token_id")},
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def llama_bitnet(folder, linear_class: str = "bitlinear", seed: int = 0) -> TinyCheckpoint:
    """Llama-BitNet style (HF1BitLLM/Llama3-8B-1.58, Falcon3-1.58bit): LlamaForCausalLM + bitnet quant config, packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    bpe_tokenizer(folder)
    vocab = _vocab_size(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                      max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    _randomize_norms(model, torch.Generator().manual_seed(seed))
    model.to(torch.bfloat16).save_pretrained(str(folder))
    ckpt = TinyCheckpoint(folder, "llama-bitnet", "packed", {})
    _pack_into(folder, {"quantization_config": {"quant_method": "bitnet", "linear_class": linear_class,
                                                "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}},
               linear_class, ckpt)
    return ckpt


def offline_hub_cache(files: Path, repo_id: str, sha: str, tmp_path: Path, monkeypatch) -> None:
    """A huggingface_hub cache holding `files` as repo_id@sha (refs/main), with the hub set offline."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / sha
    blobs = repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for f in files.iterdir():  # the real layout: snapshot files are links into blobs/
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables at import; set its constants too.
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


def rewrite_packed(src, dst, edit=None, extra=(), config=None, tokenizer=None) -> None:
    """See the module docstring."""
    from bitnet158.formats.packed import PackedFile, PackedWriter, TensorSpec

    with PackedFile(src) as pf:
        entries = []
        for i in pf.tensors.values():
            spec = TensorSpec(i.name, i.dtype, tuple(i.shape), i.scale, i.scale_granularity)
            entry = (spec, pf.torch(i.name)) if edit is None else edit(spec, pf.torch(i.name))
            if entry is not None:
                entries.append(entry)
        entries += list(extra)
        specs = [spec for spec, _ in entries]
        with PackedWriter(dst, config={**pf.config, **(config or {})}, tokenizer={**pf.tokenizer, **(tokenizer or {})},
                          provenance=pf.provenance, tensors=specs) as w:
            for spec, data in entries:
                w.write(spec.name, data)


# --- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny():
    """The factories above, for tests that build (and then modify) their own checkpoint."""
    return SimpleNamespace(
        bpe_tokenizer=bpe_tokenizer, sentencepiece_tokenizer=sentencepiece_tokenizer,
        microsoft_latent=microsoft_latent, microsoft_packed=microsoft_packed, onebitllm=onebitllm,
        onebitllm_as_transformers=onebitllm_as_transformers, llama_bitnet=llama_bitnet,
        offline_hub_cache=offline_hub_cache, rewrite_packed=rewrite_packed,
        TinyCheckpoint=TinyCheckpoint, ENCODE_SAMPLES=ENCODE_SAMPLES, CHAT_TEMPLATE=CHAT_TEMPLATE,
        BOS=BOS, EOS=EOS, EOT=EOT)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory) -> Path:
    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp_tok"))


@pytest.fixture(scope="session")
def ms_latent(tmp_path_factory) -> TinyCheckpoint:
    return microsoft_latent(tmp_path_factory.mktemp("ms_latent"))


@pytest.fixture(scope="session")
def ms_packed_auto(tmp_path_factory) -> TinyCheckpoint:
    return microsoft_packed(tmp_path_factory.mktemp("ms_packed_auto"), linear_class="autobitlinear")


@pytest.fixture(scope="session")
def ms_packed_bitlinear(tmp_path_factory) -> TinyCheckpoint:
    return microsoft_packed(tmp_path_factory.mktemp("ms_packed_bitlinear"), linear_class="bitlinear")


@pytest.fixture(scope="session")
def onebitllm_ckpt(tmp_path_factory) -> TinyCheckpoint:
    return onebitllm(tmp_path_factory.mktemp("onebitllm"))


@pytest.fixture(scope="session")
def llama_bitnet_ckpt(tmp_path_factory) -> TinyCheckpoint:
    return llama_bitnet(tmp_path_factory.mktemp("llama_bitnet"))
