"""The independent side of ``bitnet-compare --engine-b transformers``: transformers' own model class on an HF
checkpoint, in float32.

    model = load_transformers("microsoft/bitnet-b1.58-2B-4T", torch.device("cpu"))
    model.logits(ids)  # float32 [T, V], the surface compare_models takes (with .tokenizer and .config)

Our converter and runtime are what the comparison tests, so this side runs neither: transformers reads the
checkpoint's tensors, unpacks or ternarizes them and runs its own forward, and the tokenizer is AutoTokenizer's.
From the converter it takes only ``load_hf_source``'s resolving (hub id → snapshot folder) and family check,
which refuses a plain Llama checkpoint rather than guess (REFERENCE.md §5).

transformers runs a BitNet checkpoint as BitNet only when told to (REFERENCE.md §2, §4, §5):
- Microsoft (BitNetForCausalLM), packed: the checkpoint's own quantization_config (offline) says how; as it is.
- Microsoft, latent (float masters, like the -bf16 repo): without an online quantization_config transformers runs
  plain float linears, neither ternary weights nor int8 activations. It gets transformers' online autobitlinear,
  which ternarizes by absmean at every forward, as our converter does once.
- 1bitLLM (``model_type: llama``): the Auto classes would build a plain LlamaForCausalLM, which drops both sub-norms
  and quantizes nothing: the word salad of REFERENCE §5. It runs as BitNetForCausalLM with SiLU, its rope theta, a
  tied head and online autobitlinear, its sub-norm keys renamed on load.
- Llama-BitNet (LlamaForCausalLM with a bitnet quantization_config): as it is.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from bitnet158.compare.core import CompareError

logger = logging.getLogger(__name__)

# transformers' online quantization: weights ternarized by absmean, activations to int8 per token, at each forward
ONLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}
# 1bitLLM's sub-norm names → BitNetForCausalLM's (from_pretrained's key_mapping: regex → replacement)
SUB_NORM_KEYS = {r"\.inner_attn_ln\.": ".attn_sub_norm.", r"\.ffn_layernorm\.": ".ffn_sub_norm."}
# what BitNetConfig takes as it is from a 1bitLLM checkpoint's Llama config (rope: rope_theta and rope_scaling in
# transformers 4, rope_parameters in 5)
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
               "rope_theta", "rope_scaling", "rope_parameters")


class TransformersModel:
    """A transformers causal LM with the surface compare_models takes: ``logits(ids)``, ``tokenizer``, ``config``."""

    def __init__(self, model, tokenizer, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer  # AutoTokenizer: encode(text) adds BOS as the checkpoint's tokenizer says
        self.config = model.config  # .vocab_size, .max_position_embeddings
        self.device = device

    def logits(self, ids) -> torch.Tensor:
        """float32 logits [T, V] of token ids [T], one full forward without a cache."""
        with torch.inference_mode():
            out = self.model(torch.tensor([list(ids)], device=self.device), use_cache=False).logits  # [1, T, V]
        return out[0].float()


def _config(folder: Path, family: str, form: str):
    # the config transformers must load the checkpoint with (the module docstring), or None for its own
    from transformers import AutoConfig, BitNetConfig

    if family == "1bitllm":
        # read by transformers as the Llama config it says it is (its defaults: kv heads = heads, rope theta 10000)
        llama = AutoConfig.from_pretrained(str(folder)).to_dict()
        kept = {k: llama[k] for k in _LLAMA_KEYS if k in llama}
        return BitNetConfig(hidden_act="silu", tie_word_embeddings=True, quantization_config=ONLINE, **kept)
    if family == "bitnet" and form == "latent":
        config = AutoConfig.from_pretrained(str(folder))
        given = getattr(config, "quantization_config", None)
        if not (isinstance(given, dict) and given.get("quantization_mode") == "online"):
            logger.warning("%s holds float master weights and its quantization_config is %s; transformers runs them "
                           "with %s (ternarized at each forward), as the converter does", folder, given, ONLINE)
            config.quantization_config = ONLINE
        return config
    return None


def cast_float32(model) -> None:
    # transformers keeps a quantized checkpoint's weight_scale and some float tensors in the file's bf16 even with
    # dtype=float32, and refuses .float() on quantized models: cast every float parameter and buffer in place
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.float()


def load_transformers(src: str, device: torch.device) -> TransformersModel:
    """transformers' model and tokenizer of the HF checkpoint ``src`` (a folder, or a hub id org/name fetched into
    huggingface_hub's cache) in float32 on ``device``, run as its family needs (the module docstring)."""
    if Path(src).is_file():
        raise CompareError(f"{src}: the transformers engine runs an HF checkpoint (a folder or a hub id org/name), "
                           "not a file")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CompareError("the transformers engine needs transformers and accelerate: "
                           "pip install 'bitnet158[reference]'") from e
    from bitnet158.converter.hf import load_hf_source

    with load_hf_source(src) as hf:  # resolves a hub id; refuses what is none of the three families
        folder, family, form = hf.folder, hf.family, hf.form
    kwargs = {"key_mapping": SUB_NORM_KEYS} if family == "1bitllm" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), config=_config(folder, family, form),
                                                     dtype=torch.float32, device_map={"": str(device)}, **kwargs)
        # compare_models encodes the whole text and then cuts it to the context itself: no warning about its length
        tokenizer = AutoTokenizer.from_pretrained(str(folder), model_max_length=sys.maxsize)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise CompareError(f"transformers cannot load {src}: {type(e).__name__}: {e}") from e
    cast_float32(model)
    logger.info("transformers runs %s (%s family, %s weights) as %s", src, family, form, type(model).__name__)
    return TransformersModel(model.eval(), tokenizer, device)
