"""HF → packed converter: every family and form, exact codes and scales, tokenizer, strictness, CLI, hub cache."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bitnet158.converter.cli import main
from bitnet158.converter.hf import ConversionError, convert_hf, load_hf_source
from bitnet158.formats.packed import PackedFile
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

LINEARS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# --- independent oracles ----------------------------------------------------------------------------------------
def decode_t2(packed: np.ndarray, in_features: int) -> np.ndarray:
    """PACKED.md §2.1 written out in numpy: byte j of a row holds weights 4j+k at bits 2k..2k+1, code = t + 1."""
    out = np.empty((packed.shape[0], packed.shape[1] * 4), dtype=np.int8)
    for k in range(4):
        out[:, k::4] = ((packed >> (2 * k)) & 3).astype(np.int8) - 1
    return out[:, :in_features]


def absmean(w: torch.Tensor) -> tuple[np.ndarray, np.float32]:
    """REFERENCE §2 written out here: m = max(mean|W|, 1e-5) in fp32 (torch's reduction, as the reference
    computes it; a float64 mean agrees to an ulp), t = clamp(round(W/m), -1, 1) with round half to even."""
    wf = w.float()
    m = wf.abs().mean().clamp(min=1e-5)
    assert abs(float(m) - max(wf.double().abs().mean().item(), 1e-5)) <= 2e-7 * float(m)
    return np.clip(np.round(wf.numpy() / m.numpy()), -1, 1).astype(np.int8), np.float32(m.item())


def convert(ckpt_or_path, tmp_path: Path, name: str = "out.bnp", **kw) -> Path:
    src = ckpt_or_path.path if hasattr(ckpt_or_path, "path") else ckpt_or_path
    out = tmp_path / name
    convert_hf(str(src), str(out), progress=False, **kw)
    return out


def copy_ckpt(ckpt, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(ckpt.path, dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None and k.startswith("_del_"):
            cfg.pop(k[5:], None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


CKPTS = ["ms_latent", "ms_packed_auto", "ms_packed_bitlinear", "onebitllm_ckpt", "llama_bitnet_ckpt"]


# --- every family and form --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", CKPTS)
def test_codes_and_scales_exact(fixture, request, tmp_path):
    ckpt = request.getfixturevalue(fixture)
    out = convert(ckpt, tmp_path)
    src = load_file(str(ckpt.path / "model.safetensors"))
    with PackedFile(out) as pf:
        cfg = pf.config
        assert cfg["family"] == ckpt.family
        assert cfg["sub_norms"] == (ckpt.family != "llama-bitnet")
        assert cfg["hidden_act"] == ("relu2" if ckpt.family == "bitnet" else "silu")
        n_linear = 0
        for i in range(cfg["num_hidden_layers"]):
            for lin in LINEARS:
                name = f"layers.{i}.{lin}.weight"
                info = pf.tensors[name]
                assert info.dtype == "t2" and info.scale == name + "_scale" and info.scale_granularity == "tensor"
                packed, scale = pf.ternary(name)
                codes = decode_t2(packed.numpy(), info.shape[1])
                if ckpt.form == "latent":
                    want_t, want_m = absmean(ckpt.latent[name])
                else:
                    t, s = ckpt.ternary[name]
                    want_t, want_m = t.numpy(), np.float32(s)
                np.testing.assert_array_equal(codes, want_t, err_msg=name)
                assert scale.dtype == torch.float32 and scale.shape == (1,)
                assert scale.numpy()[0] == want_m, name
                n_linear += 1
        assert n_linear == 7 * cfg["num_hidden_layers"]
        # Float tensors: the source values in bf16, under their canonical names.
        sub = {"bitnet": ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm"),
               "1bitllm": ("self_attn.inner_attn_ln", "mlp.ffn_layernorm")}.get(ckpt.family)
        pairs = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        for i in range(cfg["num_hidden_layers"]):
            pairs[f"layers.{i}.attn_norm.weight"] = f"model.layers.{i}.input_layernorm.weight"
            pairs[f"layers.{i}.mlp_norm.weight"] = f"model.layers.{i}.post_attention_layernorm.weight"
            if sub:
                pairs[f"layers.{i}.attn.sub_norm.weight"] = f"model.layers.{i}.{sub[0]}.weight"
                pairs[f"layers.{i}.mlp.sub_norm.weight"] = f"model.layers.{i}.{sub[1]}.weight"
            else:
                assert f"layers.{i}.attn.sub_norm.weight" not in pf.tensors
        if not cfg["tie_word_embeddings"]:
            pairs["lm_head.weight"] = "lm_head.weight"
        else:
            assert "lm_head.weight" not in pf.tensors
        for canon, hf in pairs.items():
            assert pf.tensors[canon].dtype == "bf16"
            assert torch.equal(pf.torch(canon), src[hf].to(torch.bfloat16)), canon
        n_float = len(pairs)
        assert len(pf.tensors) == 2 * n_linear + n_float  # nothing else in the file
        pf.verify()


def test_config_fields(ms_packed_auto, onebitllm_ckpt, llama_bitnet_ckpt, tmp_path):
    with PackedFile(convert(ms_packed_auto, tmp_path, "a.bnp")) as pf:
        c = pf.config
        tok = json.loads(pf.tokenizer["tokenizer_json"])
        ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
        assert c["rope_theta"] == 500000.0 and c["rope_style"] == "neox" and c["rope_scaling"] is None
        assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, 160, 2)
        assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
        assert c["tie_word_embeddings"] is True and c["max_position_embeddings"] == 256
        assert c["bos_token_id"] == ids["<|begin_of_text|>"]
        # config eos, then generation_config's list (which adds <|eot_id|>), deduplicated.
        assert c["eos_token_id"] == [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
        assert c["vocab_size"] == ms_packed_auto.config["vocab_size"]
        assert set(c) == {"family", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "rope_theta",
                          "rope_style", "rope_scaling", "rms_norm_eps", "hidden_act", "sub_norms",
                          "tie_word_embeddings", "bos_token_id", "eos_token_id"}
    with PackedFile(convert(onebitllm_ckpt, tmp_path, "b.bnp")) as pf:
        assert pf.config["rope_theta"] == 10000.0 and pf.config["bos_token_id"] == 1
        assert pf.config["eos_token_id"] == [2]
    with PackedFile(convert(llama_bitnet_ckpt, tmp_path, "c.bnp")) as pf:
        assert pf.config["tie_word_embeddings"] is False and pf.config["rope_theta"] == 500000.0


def test_provenance(ms_latent, tmp_path):
    with PackedFile(convert(ms_latent, tmp_path)) as pf:
        p = pf.provenance
    assert p["source"] == str(ms_latent.path.resolve()) and p["revision"] is None
    assert p["converter"] == f"bitnet158 {importlib.metadata.version('bitnet158')}"
    assert p["created"].endswith("Z") and p["source_dtype"] == "bfloat16"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(p["files"])
    for name, digest in p["files"].items():
        assert digest == hashlib.sha256((ms_latent.path / name).read_bytes()).hexdigest(), name


def test_load_hf_source_api(onebitllm_ckpt):
    with load_hf_source(str(onebitllm_ckpt.path)) as hf:
        assert hf.family == "1bitllm" and hf.form == "latent"
        assert set(hf.skipped) == {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(2)}
        items = list(hf.tensors())
        assert [n for n, _, _ in items] == list(hf.shapes)
        name, kind, load = next(x for x in items if x.kind == "linear")
        t, m = load()
        want_t, want_m = absmean(onebitllm_ckpt.latent[name])
        assert np.array_equal(t.numpy(), want_t) and np.float32(m) == want_m


@pytest.mark.parametrize("dtype,torch_dtype", [("f32", torch.float32), ("f16", torch.float16)])
def test_float_dtype_option(onebitllm_ckpt, tmp_path, dtype, torch_dtype):
    src = load_file(str(onebitllm_ckpt.path / "model.safetensors"))
    with PackedFile(convert(onebitllm_ckpt, tmp_path, dtype=dtype)) as pf:
        assert pf.tensors["embed.weight"].dtype == dtype
        assert torch.equal(pf.torch("embed.weight"), src["model.embed_tokens.weight"].to(torch_dtype))


def test_already_ternary_times_c_keeps_c(tiny, tmp_path):
    ckpt = tiny.microsoft_latent(tmp_path / "src")
    state = load_file(str(ckpt.path / "model.safetensors"))
    hf_name = "model.layers.1.mlp.up_proj.weight"
    c = torch.tensor(0.0371, dtype=torch.bfloat16)
    t = torch.sign(state[hf_name]).to(torch.int8)
    t[::3] = 0  # a third of the rows zero: absmean would give c · (fraction non-zero) instead of c
    state[hf_name] = t.to(torch.bfloat16) * c
    save_file(state, str(ckpt.path / "model.safetensors"))
    summary = convert_hf(str(ckpt.path), str(tmp_path / "o.bnp"), progress=False)
    assert summary.kept_scaled_ternary == 1
    with PackedFile(tmp_path / "o.bnp") as pf:
        packed, scale = pf.ternary("layers.1.mlp.up_proj.weight")
        assert scale.item() == float(c.float())
        assert np.array_equal(decode_t2(packed.numpy(), 64), t.numpy())
        _, requantized = absmean(state[hf_name])
        assert requantized < 0.7 * float(c)  # what re-ternarizing would have stored


@pytest.mark.parametrize("fixture", ["ms_packed_auto", "ms_packed_bitlinear", "ms_packed_bitlinear/no-linear-class",
                                     "llama_bitnet_ckpt"])
def test_scale_conventions_match_transformers(fixture, request, tmp_path):
    """W = scale · t from our file equals the weight transformers itself applies (multiply vs divide).
    "/no-linear-class": a quantization_config without linear_class, which transformers reads as "bitlinear"."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import (
        AutoBitLinear,
        BitLinear,
        unpack_weights,
    )

    name, _, variant = fixture.partition("/")
    ckpt = request.getfixturevalue(name)
    src = ckpt.path
    if variant:
        src = copy_ckpt(ckpt, tmp_path)
        qc = {k: v for k, v in ckpt.config["quantization_config"].items() if k != "linear_class"}
        edit_json(src / "config.json", quantization_config=qc)
    model, info = AutoModelForCausalLM.from_pretrained(str(src), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with PackedFile(convert(src, tmp_path)) as pf:
        for i, layer in enumerate(model.model.layers):
            for lin in LINEARS:
                mod = layer.get_submodule(lin.replace("attn.", "self_attn."))
                ws = mod.weight_scale.float()
                if isinstance(mod, AutoBitLinear):  # y = linear(x, t) · ws
                    effective = mod.weight.float() * ws
                else:
                    assert isinstance(mod, BitLinear)  # y = linear(x, t) / ws
                    effective = unpack_weights(mod.weight, dtype=torch.float32) / ws
                packed, scale = pf.ternary(f"layers.{i}.{lin}.weight")
                ours = torch.from_numpy(decode_t2(packed.numpy(), packed.shape[1] * 4)).float() * scale
                torch.testing.assert_close(ours, effective, rtol=1e-6, atol=0)


def test_both_conventions_same_model(ms_packed_auto, ms_packed_bitlinear, tmp_path):
    """The same model packed with either linear_class gives the same codes and scales within bf16 storage."""
    with PackedFile(convert(ms_packed_auto, tmp_path, "a.bnp")) as a, \
            PackedFile(convert(ms_packed_bitlinear, tmp_path, "b.bnp")) as b:
        for name in [n for n, i in a.tensors.items() if i.dtype == "t2"]:
            pa, sa = a.ternary(name)
            pb, sb = b.ternary(name)
            assert torch.equal(pa, pb)
            assert abs(sa.item() / sb.item() - 1) < 2 ** -7  # both from a bf16 weight_scale


def test_transformers_loads_fixtures(tiny, ms_latent, onebitllm_ckpt, tmp_path):
    """The latent Microsoft and 1bitLLM references load in transformers' BitNetForCausalLM without key surprises."""
    from transformers import AutoModelForCausalLM, BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    for path in (ms_latent.path, tiny.onebitllm_as_transformers(onebitllm_ckpt, tmp_path / "tf")):
        model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
        assert isinstance(model, BitNetForCausalLM)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, AutoBitLinear) and q.online_quant
        logits = model(torch.tensor([[1, 5, 9]])).logits
        assert torch.isfinite(logits).all()


# --- tokenizer ----------------------------------------------------------------------------------------------------
def _roundtrip(folder: Path, pf: PackedFile, samples):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_str(pf.tokenizer["tokenizer_json"])
    ref = AutoTokenizer.from_pretrained(str(folder))
    for s in samples:
        assert ours.encode(s).ids == ref.encode(s), repr(s)
        assert ours.encode(s, add_special_tokens=False).ids == ref.encode(s, add_special_tokens=False), repr(s)
    return ref


def test_tokenizer_bpe_roundtrip_and_chat_template(tiny, ms_packed_auto, tmp_path):
    with PackedFile(convert(ms_packed_auto, tmp_path)) as pf:
        ref = _roundtrip(ms_packed_auto.path, pf, tiny.ENCODE_SAMPLES)
        tok = pf.tokenizer
        assert tok["chat_template"] == tiny.CHAT_TEMPLATE == ref.chat_template
        assert (tok["bos_token"], tok["eos_token"]) == (tiny.BOS, tiny.EOS)
        assert tok["add_bos_token"] is True and tok["add_eos_token"] is False
        msgs = [{"role": "user", "content": "hi"}]
        assert ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
            f"{tiny.BOS}User: hi{tiny.EOT}Assistant: "


def test_tokenizer_sentencepiece_roundtrip(tiny, onebitllm_ckpt, tmp_path):
    with PackedFile(convert(onebitllm_ckpt, tmp_path)) as pf:
        _roundtrip(onebitllm_ckpt.path, pf, tiny.ENCODE_SAMPLES + ["</s> inside", "<s>"])
        tok = pf.tokenizer
        assert (tok["bos_token"], tok["eos_token"], tok["add_bos_token"]) == ("<s>", "</s>", True)
        assert tok["chat_template"] is None


def test_tokenizer_config_flags_and_jinja_file(tiny, tmp_path):
    """With a tokenizer.json, transformers v5 keeps its post-processor whatever add_eos_token says; so do we.
    A chat_template.jinja file wins over the config's template, as in transformers."""
    ckpt = tiny.onebitllm(tmp_path / "src", tokenizer="bpe")
    edit_json(ckpt.path / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    (ckpt.path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    with PackedFile(convert(ckpt, tmp_path)) as pf:
        ref = _roundtrip(ckpt.path, pf, tiny.ENCODE_SAMPLES)
        assert pf.tokenizer["add_bos_token"] is True and pf.tokenizer["add_eos_token"] is False
        assert pf.tokenizer["chat_template"] == "{{ messages[0]['content'] }}" == ref.chat_template
    (ckpt.path / "chat_template.jinja").write_bytes(b"{{ \xff }}")
    with pytest.raises(ConversionError, match="chat_template.jinja: cannot read it as UTF-8 text"):
        convert(ckpt, tmp_path, "bad.bnp")


# a post-processor naming a special token that it does not map: tokenizers loads it, then panics on encode
PANICKING_POST_PROCESSOR = {
    "type": "TemplateProcessing", "special_tokens": {},
    "single": [{"SpecialToken": {"id": "<nope>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
}


def test_tokenizer_that_panics_is_refused(tiny, tmp_path):
    ckpt = tiny.onebitllm(tmp_path / "src", tokenizer="bpe")
    edit_json(ckpt.path / "tokenizer.json", post_processor=PANICKING_POST_PROCESSOR)
    with pytest.raises(ConversionError, match=r"tokenizer\.json: cannot load or use it"):
        convert(ckpt, tmp_path)
    assert not list(tmp_path.glob("out.bnp*")) and not list(tmp_path.glob(".out.bnp*"))


def test_tokenizer_config_not_an_object_and_ctrl_c(tiny, tmp_path, monkeypatch):
    ckpt = tiny.onebitllm(tmp_path / "src", tokenizer="bpe")
    good = (ckpt.path / "tokenizer_config.json").read_text()
    (ckpt.path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ConversionError, match=r"tokenizer_config.json: expected a JSON object, found list"):
        convert(ckpt, tmp_path)
    (ckpt.path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's stack
    with pytest.raises(ConversionError, match=r"tokenizer_config.json: cannot read it as JSON \(maximum recursion"):
        convert(ckpt, tmp_path)
    (ckpt.path / "tokenizer_config.json").write_text(good)

    import transformers

    def interrupted(*args, **kwargs):  # Ctrl-C while transformers loads the tokenizer is the user's, not a bad file
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(ckpt, tmp_path)
    assert not list(tmp_path.glob("out.bnp*")) and not list(tmp_path.glob(".out.bnp*"))


def test_output_over_a_source_file_is_refused(onebitllm_ckpt, tmp_path):
    # with --force the rename at the end would replace the checkpoint's own file with the packed output
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(ConversionError, match=f"{name} is the source file .*: write the output to another path"):
            convert_hf(str(src), str(src / name), force=True, progress=False)
    link = tmp_path / "link.json"  # the same file by another name
    link.symlink_to(src / "config.json")
    with pytest.raises(ConversionError, match="is the source file"):
        convert_hf(str(src), str(link), force=True, progress=False)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


# --- strictness ---------------------------------------------------------------------------------------------------
def _add_tensor(folder: Path, name: str, value: torch.Tensor) -> None:
    state = load_file(str(folder / "model.safetensors"))
    state[name] = value
    save_file(state, str(folder / "model.safetensors"))


def test_unexpected_tensor_is_an_error(onebitllm_ckpt, tmp_path):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    _add_tensor(src, "model.layers.0.mlp.extra_proj.weight", torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ConversionError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra_proj\.weight"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()


def test_missing_and_misshapen_tensors(onebitllm_ckpt, tmp_path):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.mlp.ffn_layernorm.weight"]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.ffn_layernorm\.weight.*missing"):
        convert(src, tmp_path)
    state["model.layers.1.mlp.ffn_layernorm.weight"] = torch.ones(7, dtype=torch.float16)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"ffn_layernorm\.weight: shape \(7,\), expected \(160,\)"):
        convert(src, tmp_path)
    state["model.layers.1.mlp.ffn_layernorm.weight"] = torch.ones(160, dtype=torch.float16)
    up = state["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.0.mlp.up_proj.weight"] = up[:-1]
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj\.weight: shape \(159, 64\), expected \(160, 64\)"):
        convert(src, tmp_path)
    state["model.layers.0.mlp.up_proj.weight"] = up.to(torch.int8)
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"up_proj\.weight: expected a float latent weight, found torch.int8"):
        convert(src, tmp_path)


def test_latent_weight_with_a_scale_and_f16_overflow_refused(ms_latent, tmp_path):
    src = copy_ckpt(ms_latent, tmp_path)
    good = load_file(str(src / "model.safetensors"))
    _add_tensor(src, "model.layers.0.mlp.up_proj.weight_scale", torch.ones(1, dtype=torch.bfloat16))
    with pytest.raises(ConversionError, match=r"up_proj.weight is a float weight but \S+ exists"):
        convert(src, tmp_path)
    big = torch.full((64,), 1e5, dtype=torch.bfloat16)  # past f16's 65,504
    save_file({**good, "model.norm.weight": big}, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"norm.weight: not finite after conversion to f16"):
        convert(src, tmp_path, dtype="f16")
    assert not (tmp_path / "out.bnp").exists()
    convert(src, tmp_path)  # bf16 holds it


def test_bias_refused(onebitllm_ckpt, tmp_path):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    _add_tensor(src, "model.layers.0.self_attn.q_proj.bias", torch.zeros(64, dtype=torch.float16))
    with pytest.raises(ConversionError, match=r"has bias tensors \(model.layers.0.self_attn.q_proj.bias\)"):
        convert(src, tmp_path)


def test_plain_llama_refused(llama_bitnet_ckpt, onebitllm_ckpt, tmp_path):
    src = copy_ckpt(llama_bitnet_ckpt, tmp_path)
    edit_json(src / "config.json", _del_quantization_config=None)
    with pytest.raises(ConversionError, match="plain Llama model"):
        convert(src, tmp_path)
    # A 1bitLLM checkpoint whose config lost its architecture is refused too, with a hint.
    src2 = tmp_path / "src2"
    shutil.copytree(onebitllm_ckpt.path, src2)
    edit_json(src2 / "config.json", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError, match="plain Llama model.*1bitLLM"):
        convert(src2, tmp_path)


@pytest.mark.parametrize("change,message", [
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear", "use_rms_norm": True}},
     "use_rms_norm"),
    # read as "bitlinear", a misspelt "autobitlinear" would invert every scale
    ({"quantization_config": {"quant_method": "bitnet", "linear_class": "AutoBitLinear"}},
     "quantization_config.linear_class 'AutoBitLinear' is not one of bitlinear, autobitlinear"),
    ({"quantization_config": {"quant_method": "bitnet", "quantization_mode": "dynamic"}},
     "quantization_config.quantization_mode 'dynamic' is not one of offline, online"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5: rotary embeddings over part of each head"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
     "partial_rotary_factor 0.25"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "unsupported model"),
    ({"architectures": 256}, "architectures must be a list of class names"),
    ({"num_hidden_layers": 1000}, r"num_hidden_layers is \d+, but the checkpoint holds tensors of \d+ layers"),
    ({"architectures": [["LlamaForCausalLM"]]}, "architectures must be a list of class names"),
    ({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": ["model.layers.0.mlp.up_proj"]}},
     "modules_to_not_convert"),
    # each sanity check of config.json names the key: a lying or broken config never reaches the plan
    ({"hidden_act": "relu2"}, "hidden_act 'relu2', but the llama-bitnet family uses silu"),
    ({"rope_scaling": [2.0]}, "rope_scaling must be an object or null"),
    ({"rope_scaling": {"rope_type": "default", "factor": 2.0}},
     r"rope type 'default' with the parameters \['factor'\] is not supported"),
    ({"hidden_size": 0}, r"hidden_size must be a positive integer, found 0"),
    ({"num_attention_heads": True}, r"num_attention_heads must be a positive integer, found True"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "_del_head_dim": None},
     "hidden_size 64 is not a multiple of num_attention_heads 3"),
    ({"head_dim": 15}, "head_dim 15 is odd"),
    ({"rope_parameters": 5, "_del_rope_theta": None}, "rope_parameters must be an object"),
    # (the fixture's rope_parameters holds its own rope_theta, which transformers takes over the top-level one)
    ({"rope_theta": -1.0, "_del_rope_parameters": None}, r"rope_theta must be a positive number, found -1.0"),
    ({"rope_theta": "1e4", "_del_rope_parameters": None}, r"rope_theta must be a positive number, found '1e4'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, r"rope_theta must be a positive number"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "config.json: rope_scaling high_freq_factor must exceed low_freq_factor"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}},
     r"config.json: missing key 'rope_scaling.high_freq_factor'"),
    ({"original_max_position_embeddings": 0.5, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     r"config.json: rope_scaling.original_max_position_embeddings must be int, got 0.5"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"config.json: missing key 'rope_scaling.factor'"),
    # a JSON integer past the float range (valid JSON) once raised OverflowError
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10**400}}, r"rope_theta must be a positive number"),
    ({"rms_norm_eps": 10**400}, r"rms_norm_eps must be a positive number"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 10**400}},
     r"config.json: rope_scaling.factor=inf must be a finite number > 0"),
    ({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": "lm_head"}},
     r"modules_to_not_convert must be a list of module names, found 'lm_head'"),
    ({"quantization_config": {"quant_method": "bitnet", "modules_to_not_convert": ["lm_head", "(q"]}},
     r"modules_to_not_convert \['lm_head', '\(q'\]: not valid regular expressions"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps must be a positive number, found 0"),
    ({"vocab_size": 10}, r"the tokenizer has token id \d+ but config.json vocab_size is 10"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false, found 'yes'"),
    ({"bos_token_id": "0"}, "bos_token_id must be an integer, found '0'"),
    ({"eos_token_id": [1, "2"]}, r"config.json: eos_token_id must be an integer or a list of integers"),
    ({"eos_token_id": 100000}, r"bos/eos token ids \[100000\] are outside the vocabulary"),
])
def test_unsupported_configs_refused(llama_bitnet_ckpt, tmp_path, change, message):
    src = copy_ckpt(llama_bitnet_ckpt, tmp_path)
    edit_json(src / "config.json", **change)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path)


@pytest.mark.parametrize("fixture,architectures,message", [
    ("onebitllm_ckpt", ["BitNetForCausalLM"], r"says BitNetForCausalLM but the tensors use 1bitLLM names"),
    ("ms_packed_auto", ["BitnetForCausalLM"], r"BitnetForCausalLM \(1bitLLM\) but the tensors use Microsoft names"),
    ("ms_packed_auto", ["LlamaForCausalLM"], r"says LlamaForCausalLM, which has no sub-norms, but the tensors include"),
])
def test_architecture_that_contradicts_the_tensors_is_refused(fixture, architectures, message, request, tmp_path):
    # the sub-norms' names tell the families apart: a config.json naming another family is wrong, not a hint
    src = copy_ckpt(request.getfixturevalue(fixture), tmp_path)
    edit_json(src / "config.json", architectures=architectures, _del_model_type=None)
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path)


def test_a_null_bos_id_is_the_tokenizers(llama_bitnet_ckpt, tmp_path):
    # "bos_token_id": null in config.json reads as absent (as transformers reads it): the tokenizer's BOS id, which
    # its post-processor adds, not None (a GGUF export of such a file could not say which token it adds)
    from bitnet158.formats.packed import PackedFile

    want = convert(copy_ckpt(llama_bitnet_ckpt, tmp_path / "a"), tmp_path / "a")
    src = copy_ckpt(llama_bitnet_ckpt, tmp_path / "b")
    edit_json(src / "config.json", bos_token_id=None)
    (src / "generation_config.json").unlink(missing_ok=True)  # nor a generation_config to take it from
    with PackedFile(want) as a, PackedFile(convert(src, tmp_path / "b")) as b:
        assert a.config["bos_token_id"] is not None and b.config["bos_token_id"] == a.config["bos_token_id"]


def test_a_token_id_past_the_embedding_is_refused(llama_bitnet_ckpt, tmp_path):
    # the bound is the largest id, not the count of tokens: one id moved past vocab_size (a gap below it) once
    # converted, and the runtime then refused the file (runtime/loader.py)
    src = copy_ckpt(llama_bitnet_ckpt, tmp_path)
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    moved = next(w for w, i in vocab.items() if i == len(vocab) - 1)
    vocab[moved] = vocab_size
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ConversionError, match=f"the tokenizer has token id {vocab_size} but config.json vocab_size"):
        convert(src, tmp_path)


def test_bad_bitnet_configs_and_unreadable_sources_are_refused(ms_packed_auto, tmp_path):
    src = copy_ckpt(ms_packed_auto, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    edit_json(src / "config.json", hidden_act="gelu")  # relu2 and silu are the only activations
    with pytest.raises(ConversionError, match=r"hidden_act 'gelu' is not supported \(relu2 or silu\)"):
        convert(src, tmp_path)
    edit_json(src / "config.json", hidden_act="relu2", quantization_config={"quant_method": "gptq"})
    with pytest.raises(ConversionError, match=r"quantization_config \{'quant_method': 'gptq'\} is not a bitnet one"):
        convert(src, tmp_path)
    (src / "config.json").write_text(json.dumps([cfg]))
    with pytest.raises(ConversionError, match=r"config.json: expected a JSON object"):
        convert(src, tmp_path)
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # nested past Python's stack: not a traceback
    with pytest.raises(ConversionError, match=r"config.json: cannot read it as JSON \(maximum recursion"):
        convert(src, tmp_path)
    with pytest.raises(ConversionError, match=r"is a file; give the model folder"):
        convert(src / "config.json", tmp_path)
    with pytest.raises(ConversionError, match=r"no such folder, and not a hub id of the form org/name"):
        convert(tmp_path / "no" / "such" / "folder", tmp_path)
    assert not (tmp_path / "out.bnp").exists()


def test_a_folder_of_gguf_files_points_to_gguf_to_packed(tmp_path):
    # a GGUF download (e.g. microsoft/bitnet-b1.58-2B-4T-gguf) has no config.json: the error names the other command
    (tmp_path / "ggml-model-i2_s.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConversionError, match=r"no config\.json; it holds GGUF files \(ggml-model-i2_s\.gguf\): use "
                                              r"bitnet-convert gguf-to-packed"):
        convert(tmp_path, tmp_path, "x.bnp")
    (tmp_path / "ggml-model-i2_s.gguf").unlink()
    with pytest.raises(ConversionError, match=r"no config\.json$"):
        convert(tmp_path, tmp_path, "x.bnp")


def test_rope_spellings(onebitllm_ckpt, tmp_path):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    # transformers v5 spelling: rope_parameters, dtype.
    edit_json(src / "config.json", _del_rope_theta=None, _del_rope_scaling=None, _del_torch_dtype=None,
              dtype="float16", rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    with load_hf_source(str(src)) as hf:
        assert hf.config["rope_theta"] == 12345.0 and hf.config["rope_scaling"] is None
        assert hf.source_dtype == "float16"
    # a partial_rotary_factor of 1 is the whole head: the default rope
    edit_json(src / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 12345.0,
                                                    "partial_rotary_factor": 1.0})  # fmt: skip
    with load_hf_source(str(src)) as hf:
        assert hf.config["rope_theta"] == 12345.0 and hf.config["rope_scaling"] is None
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 128}
    edit_json(src / "config.json", rope_parameters={"rope_theta": 500000.0, **llama3})
    with load_hf_source(str(src)) as hf:
        assert hf.config["rope_theta"] == 500000.0 and hf.config["rope_scaling"] == llama3
    # v4 spelling with the old "type" key.
    edit_json(src / "config.json", _del_rope_parameters=None, rope_theta=10000.0,
              rope_scaling={"type": "linear", "factor": 2.0})
    with load_hf_source(str(src)) as hf:
        assert hf.config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("fixture", ["ms_latent", "onebitllm_ckpt", "llama_bitnet_ckpt"])
def test_missing_config_keys_take_transformers_defaults(fixture, request, tmp_path):
    """A config.json without rope_theta, rms_norm_eps, hidden_act or head_dim (or with null num_key_value_heads and
    head_dim) gets the values transformers' own
    config class (BitNetConfig, LlamaConfig) gives the same file: the defaults differ by family (500000 / 1e-5 /
    relu2 for BitNet, 10000 / 1e-6 / silu for Llama)."""
    from transformers import AutoConfig

    src = copy_ckpt(request.getfixturevalue(fixture), tmp_path)
    edit_json(src / "config.json", _del_rope_theta=None, _del_rope_parameters=None, _del_rope_scaling=None,
              _del_rms_norm_eps=None, _del_hidden_act=None, _del_head_dim=None)
    ref = AutoConfig.from_pretrained(str(src))
    ref_theta = ref.rope_parameters["rope_theta"] if getattr(ref, "rope_parameters", None) else ref.rope_theta
    with load_hf_source(str(src)) as hf:
        c = hf.config
    assert (c["rope_theta"], c["rms_norm_eps"], c["hidden_act"]) == (ref_theta, ref.rms_norm_eps, ref.hidden_act)
    assert c["rope_scaling"] is None and c["head_dim"] == ref.hidden_size // ref.num_attention_heads
    # null is read as absent, as transformers does: head_dim = hidden / heads, and every head a key/value head
    # (which these GQA checkpoints' k_proj then contradicts)
    edit_json(src / "config.json", head_dim=None)
    with load_hf_source(str(src)) as hf:
        assert hf.config["head_dim"] == ref.hidden_size // ref.num_attention_heads
    edit_json(src / "config.json", num_key_value_heads=None)
    assert AutoConfig.from_pretrained(str(src)).num_key_value_heads == ref.num_attention_heads
    kv_width = ref.num_attention_heads * ref.hidden_size // ref.num_attention_heads
    with pytest.raises(ConversionError, match=rf"k_proj.weight: .*\({kv_width}, {ref.hidden_size}\)"):
        load_hf_source(str(src))


# --- config.json read as transformers 5 reads it ------------------------------------------------------------------
@pytest.mark.parametrize("skip,format_v1", [
    (None, True), (["lm_head"], True), (["lm_head", "model.norm"], True),
    (["head"], True),  # a suffix of "lm_head"
    ([], False), (["lm_headx"], False),
    (["lm_head.weight"], False),  # names are module names: this one matches nothing, so the head is ternarized
    (["lm_head|model.layers.0.mlp.down_proj"], False),  # a regex
    (["lm_head", "up_proj"], False), (["lm_head", "model.layers.1"], False), (["lm_head", ""], False),
])
def test_modules_to_not_convert_is_read_as_transformers_reads_it(ms_latent, tmp_path, skip, format_v1):
    """transformers matches each entry against the module names (should_convert_module: a prefix up to a module
    boundary, a regex, or a suffix) and a null list means its own (lm_head). A config converts exactly when
    transformers then ternarizes every layer linear and keeps lm_head float: the only model format v1 holds."""
    from transformers import BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear

    src = copy_ckpt(ms_latent, tmp_path)
    edit_json(src / "config.json",
              quantization_config={**ms_latent.config["quantization_config"], "modules_to_not_convert": skip})
    model = BitNetForCausalLM.from_pretrained(str(src))
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers
    assert (all(isinstance(m, AutoBitLinear) for m in linears) and type(model.lm_head) is torch.nn.Linear) == format_v1
    if format_v1:
        convert(src, tmp_path)
    else:
        with pytest.raises(ConversionError, match=r"modules_to_not_convert .*: transformers then (keeps|ternarizes)"):
            convert(src, tmp_path)


def test_a_tied_config_with_a_different_stored_head_keeps_that_head(tiny, ms_latent, tmp_path):
    """transformers 5 ties lm_head to the embedding only when the checkpoint does not store another one: a stored head
    that differs is the one it runs (kept here as an untied head); one equal to the embedding stays tied."""
    from transformers import BitNetForCausalLM

    differs = tiny.microsoft_latent(tmp_path / "differs", tie=False).path
    edit_json(differs / "config.json", tie_word_embeddings=True)
    equal = copy_ckpt(ms_latent, tmp_path / "equal")
    _add_tensor(equal, "lm_head.weight", load_file(str(equal / "model.safetensors"))["model.embed_tokens.weight"])
    for src, tied in ((differs, False), (equal, True)):
        ref = BitNetForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        assert (ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()) == tied
        with PackedFile(convert(src, tmp_path, f"{tied}.bnp")) as pf:
            assert pf.config["tie_word_embeddings"] is tied and ("lm_head.weight" in pf.tensors) is not tied
            head = pf.torch("embed.weight" if tied else "lm_head.weight")
            assert torch.equal(head.float(), ref.lm_head.weight), tied


_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("rope", [
    {"rope_theta": 1234.0},
    # the dict's own rope_theta wins over the top-level one; without one, the top-level one
    {"rope_theta": 500000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}},
    {"rope_theta": 777.0, "rope_parameters": {"rope_type": "default"}},
    # a legacy rope_scaling replaces rope_parameters whole (its rope_theta too: the class default then) ...
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_parameters": {"rope_type": "default", "rope_theta": 1e3}},
    # ... and may carry its own rope_theta; an empty one does not count
    {"rope_theta": 5.0, "rope_scaling": {"type": "linear", "factor": 4.0, "rope_theta": 99.0}},
    {"rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}},
    # llama3: a top-level original_max_position_embeddings wins over the dict's; with neither, max_position_embeddings
    {"original_max_position_embeddings": 16,
     "rope_parameters": {**_LLAMA3, "original_max_position_embeddings": 128, "rope_theta": 1000.0}},
    {"rope_parameters": {**_LLAMA3, "rope_theta": 1000.0}},
    {"original_max_position_embeddings": 16, "rope_scaling": _LLAMA3},
])
@pytest.mark.parametrize("fixture", ["ms_latent", "llama_bitnet_ckpt"])  # BitNetConfig, LlamaConfig
def test_rope_is_resolved_as_transformers_resolves_it(fixture, rope, request, tmp_path):
    """Our rope frequencies (from the config we write, as the runtime reads it) are transformers' own."""
    from bitnet158.formats.config import ModelConfig
    from bitnet158.runtime.model import rope_inv_freq
    from transformers import AutoConfig
    from transformers.models.bitnet.modeling_bitnet import BitNetRotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    src = copy_ckpt(request.getfixturevalue(fixture), tmp_path)
    edit_json(src / "config.json", _del_rope_theta=None, _del_rope_parameters=None, _del_rope_scaling=None, **rope)
    ref = AutoConfig.from_pretrained(str(src))
    rotary = (BitNetRotaryEmbedding if ref.model_type == "bitnet" else LlamaRotaryEmbedding)(ref)
    with load_hf_source(str(src)) as hf:
        config = ModelConfig.from_dict(hf.config)  # the runtime loads what is written
    assert config.rope_theta == ref.rope_parameters["rope_theta"]
    torch.testing.assert_close(rope_inv_freq(config), rotary.inv_freq, rtol=0, atol=0)


def test_an_absent_num_key_value_heads_is_the_config_class_default(ms_latent, llama_bitnet_ckpt, tmp_path):
    """BitNetConfig's num_key_value_heads is 5 when config.json has none (num_attention_heads only for a null);
    LlamaConfig's is num_attention_heads. Where the default contradicts the checkpoint, the error names it."""
    from transformers import AutoConfig, BitNetConfig, BitNetForCausalLM

    src = copy_ckpt(ms_latent, tmp_path / "ten_heads")  # its tokenizer and quantization_config
    cfg = json.loads((src / "config.json").read_text())
    torch.manual_seed(0)
    model = BitNetForCausalLM(BitNetConfig(
        vocab_size=cfg["vocab_size"], hidden_size=80, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=10, num_key_value_heads=5, max_position_embeddings=256,
        bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"], tie_word_embeddings=True))
    model.to(torch.bfloat16).save_pretrained(str(src))
    edit_json(src / "config.json", quantization_config=cfg["quantization_config"], _del_num_key_value_heads=None)
    assert AutoConfig.from_pretrained(str(src)).num_key_value_heads == 5
    with PackedFile(convert(src, tmp_path)) as pf:
        assert pf.config["num_key_value_heads"] == 5
    for ckpt, default, message in (
            (ms_latent, 5, "num_attention_heads 4 is not a multiple of num_key_value_heads 5"),
            (llama_bitnet_ckpt, 4, r"k_proj.weight: packed shape .*")):
        src = copy_ckpt(ckpt, tmp_path / ckpt.family)
        edit_json(src / "config.json", _del_num_key_value_heads=None)
        ref = AutoConfig.from_pretrained(str(src))
        assert ref.num_key_value_heads == default
        with pytest.raises(ConversionError, match=rf"{message} \(config.json's num_key_value_heads is absent: "
                                                  rf"{default} is what transformers' {type(ref).__name__} then takes"):
            load_hf_source(str(src))


def test_sharded_safetensors(ms_latent, tmp_path):
    src = copy_ckpt(ms_latent, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(src / fname))
        weight_map.update({k: fname for k in keys})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a = convert(ms_latent, tmp_path, "a.bnp")
    b = convert(src, tmp_path, "b.bnp")
    with PackedFile(a) as pa, PackedFile(b) as pb:
        assert list(pa.tensors) == list(pb.tensors)
        for n in pa.tensors:
            assert torch.equal(pa.torch(n), pb.torch(n)), n
        assert set(shards) | {"model.safetensors.index.json"} <= set(pb.provenance["files"])
    # an index that is no map, names a shard outside the folder or not there, or a shard that does not hold the
    # tensor; a tensor in two shards: each refused
    index = src / "model.safetensors.index.json"
    fname, other = shards
    save_file({names[0]: state[names[0]]}, str(src / "model-extra.safetensors"))
    for weight_map, message in (
        ([fname], "weight_map is not an object"),
        ({names[0]: "../" + fname}, r"weight file \.\./model-00001-of-00002.safetensors is missing"),
        ({names[0]: "model-00003.safetensors"}, "weight file model-00003.safetensors is missing"),
        ({**weight_map, names[0]: other}, f"tensor {names[0]} is mapped to {other}, which does not hold it"),
        ({**weight_map, names[1]: "model-extra.safetensors"},
         f"tensor {names[0]} appears in both (model-00001-of-00002|model-extra).safetensors and"),
    ):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(ConversionError, match=message):
            convert(src, tmp_path, "c.bnp")
    assert not (tmp_path / "c.bnp").exists()


def test_pickle_refused_then_allowed(onebitllm_ckpt, tmp_path):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pickle.*--allow-pickle"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()
    ref = convert(onebitllm_ckpt, tmp_path, "ref.bnp")
    out = convert(src, tmp_path, allow_pickle=True)
    with PackedFile(ref) as pr, PackedFile(out) as po:
        for n in pr.tensors:
            assert torch.equal(pr.torch(n), po.torch(n)), n
        assert "pytorch_model.bin" in po.provenance["files"]
    # a pickle that is no state dict; an index naming a missing shard, or two shards holding one tensor
    out.unlink()
    torch.save([state], src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model.bin: expected a dict of tensors \(a state dict\)"):
        convert(src, tmp_path, allow_pickle=True)
    names = sorted(state)
    torch.save({k: state[k] for k in names[:2]}, src / "a.bin")
    torch.save({k: state[k] for k in names[1:]}, src / "b.bin")
    for shards, message in ((["a.bin", "c.bin"], "weight file c.bin is missing"),
                            (["a.bin", "b.bin"], f"tensor {names[1]} appears in both a.bin and b.bin")):
        index = {"weight_map": {n: shards[i % 2] for i, n in enumerate(names)}}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        with pytest.raises(ConversionError, match=message):
            convert(src, tmp_path, allow_pickle=True)
    for f in ("pytorch_model.bin", "pytorch_model.bin.index.json", "a.bin", "b.bin"):
        (src / f).unlink()
    with pytest.raises(ConversionError, match=r"no model.safetensors, model.safetensors.index.json or pytorch_model"):
        convert(src, tmp_path)
    assert not out.exists()


def test_bad_options_are_refused_before_reading(ms_packed_auto, tmp_path):
    with pytest.raises(ConversionError, match=r"dtype 'f64': choose one of bf16, f16, f32"):
        convert(ms_packed_auto, tmp_path, dtype="f64")
    (tmp_path / "dir.bnp").mkdir()
    with pytest.raises(ConversionError, match=r"dir.bnp is a folder; give a file name"):
        convert(ms_packed_auto, tmp_path, "dir.bnp", force=True)
    with pytest.raises(ConversionError, match=r"--revision applies to hub ids, but .* is a local folder"):
        convert(ms_packed_auto, tmp_path, revision="main")
    assert [p.name for p in tmp_path.iterdir()] == ["dir.bnp"] and not any((tmp_path / "dir.bnp").iterdir())


def test_overwrite_needs_force(ms_packed_auto, tmp_path):
    out = tmp_path / "out.bnp"
    out.write_bytes(b"keep me")
    with pytest.raises(ConversionError, match="exists.*--force"):
        convert(ms_packed_auto, tmp_path)
    assert out.read_bytes() == b"keep me"
    convert(ms_packed_auto, tmp_path, force=True)
    with PackedFile(out) as pf:
        assert pf.config["family"] == "bitnet"


def test_failed_conversion_leaves_nothing(tiny, tmp_path):
    ckpt = tiny.onebitllm(tmp_path / "src")
    state = load_file(str(ckpt.path / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # found only when that tensor streams
    save_file(state, str(ckpt.path / "model.safetensors"))
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    with pytest.raises(ConversionError, match="down_proj.*NaN"):
        convert(ckpt, outdir)
    assert list(outdir.iterdir()) == []


# --- CLI ------------------------------------------------------------------------------------------------------------
def test_cli_convert_and_inspect(ms_packed_bitlinear, tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.bnp"
    r = runner.invoke(main, ["hf-to-packed", str(ms_packed_bitlinear.path), "-o", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "family       bitnet (packed" in r.output and "bits/weight" in r.output and "parameters" in r.output
    r = runner.invoke(main, ["inspect", str(out), "--verify"])
    assert r.exit_code == 0, r.output
    assert "layers.1.mlp.down_proj.weight" in r.output and "verify: OK" in r.output
    # Second run without --force: one error line, exit 1, file untouched.
    before = out.read_bytes()
    r = runner.invoke(main, ["hf-to-packed", str(ms_packed_bitlinear.path), "-o", str(out)])
    assert r.exit_code == 1 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert out.read_bytes() == before
    r = runner.invoke(main, ["inspect", str(tmp_path / "nope.bnp")])
    assert r.exit_code == 1 and r.output.startswith("error:")
    r = runner.invoke(main, ["hf-to-packed", str(tmp_path / "no-such-dir"), "-o", str(tmp_path / "x.bnp")])
    assert r.exit_code == 1 and "error:" in r.output and not (tmp_path / "x.bnp").exists()
    r = runner.invoke(main, ["hf-to-packed", str(ms_packed_bitlinear.path), "-o", str(tmp_path / "no" / "x.bnp")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(main, ["hf-to-packed", str(ms_packed_bitlinear.path), "-o", str(out / "x.bnp")])
    assert r.exit_code == 1 and r.output.strip().endswith(f"{out} is not a folder")  # a file, where the folder goes


# --- the hub path, offline --------------------------------------------------------------------------------------
def test_hub_id_from_offline_cache(tiny, ms_packed_auto, tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    tiny.offline_hub_cache(ms_packed_auto.path, "tiny-org/tiny-bitnet", sha, tmp_path, monkeypatch)

    out = convert("tiny-org/tiny-bitnet", tmp_path)
    with PackedFile(out) as pf:
        assert pf.provenance["source"] == "tiny-org/tiny-bitnet" and pf.provenance["revision"] == sha
        assert pf.provenance["files"]["model.safetensors"] == hashlib.sha256(
            (ms_packed_auto.path / "model.safetensors").read_bytes()).hexdigest()
        packed, scale = pf.ternary("layers.0.attn.q_proj.weight")
        t, s = ms_packed_auto.ternary["layers.0.attn.q_proj.weight"]
        assert np.array_equal(decode_t2(packed.numpy(), 64), t.numpy()) and scale.item() == s
    convert("tiny-org/tiny-bitnet", tmp_path, "by_sha.bnp", revision=sha)
    with pytest.raises(ConversionError, match="tiny-org/not-cached"):
        convert("tiny-org/not-cached", tmp_path, "x.bnp")


@pytest.mark.parametrize("strip_added", [False, True])
def test_tokenizer_json_beside_sentencepiece(tiny, tmp_path, strip_added):
    """The real 1bitLLM repos ship tokenizer.json next to tokenizer.model: the json wins. With its added-tokens
    list emptied (older exports), the config's special tokens are registered as transformers does."""
    from transformers import AutoTokenizer

    ckpt = tiny.onebitllm(tmp_path / "src")
    tj = json.loads(AutoTokenizer.from_pretrained(str(ckpt.path)).backend_tokenizer.to_str())
    if strip_added:
        tj["added_tokens"] = []
    (ckpt.path / "tokenizer.json").write_text(json.dumps(tj))
    with PackedFile(convert(ckpt, tmp_path)) as pf:
        _roundtrip(ckpt.path, pf, tiny.ENCODE_SAMPLES + ["</s> inside", "<s><unk>", "x</s>"])
        assert "tokenizer.json" in pf.provenance["files"] and "tokenizer.model" not in pf.provenance["files"]


def test_packed_code3_and_bad_scale_refused(ms_packed_auto, tmp_path):
    src = copy_ckpt(ms_packed_auto, tmp_path)
    state = load_file(str(src / "model.safetensors"))
    good = {k: v.clone() for k, v in state.items()}
    state["model.layers.0.mlp.up_proj.weight"][3, 7] = 0b00110000  # field 2 holds code 3
    save_file(state, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="up_proj.weight: holds the unused 2-bit code 3"):
        convert(src, tmp_path)
    good["model.layers.0.mlp.up_proj.weight_scale"] = torch.zeros(1, dtype=torch.bfloat16)
    save_file(good, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="up_proj.weight_scale: the scale must be finite and > 0"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()


def test_packed_checkpoint_inconsistencies_refused(ms_packed_auto, tmp_path):
    src = copy_ckpt(ms_packed_auto, tmp_path)
    good = load_file(str(src / "model.safetensors"))
    up = "model.layers.0.mlp.up_proj.weight"
    for change, message in (
        ({"model.norm.weight": torch.ones(64, dtype=torch.int32)}, r"norm.weight: expected a float tensor, found I32"),
        ({up: torch.zeros(41, 64, dtype=torch.uint8)}, r"up_proj.weight: packed shape \(41, 64\), expected \(40, 64\)"),
        ({up + "_scale": torch.ones(2, dtype=torch.bfloat16)}, r"expected one scale per tensor, found shape \(2,\)"),
        ({up + "_scale": None}, r"up_proj.weight is packed \(uint8\) but \S+up_proj.weight_scale is missing"),
    ):
        state = {k: v for k, v in {**good, **change}.items() if v is not None}
        save_file(state, str(src / "model.safetensors"))
        with pytest.raises(ConversionError, match=message):
            convert(src, tmp_path)
    save_file(good, str(src / "model.safetensors"))
    edit_json(src / "config.json", _del_quantization_config=None)  # multiplies or divides: nothing says
    with pytest.raises(ConversionError, match=r"is packed but config.json has no quantization_config"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()


@pytest.mark.parametrize("shape", [(4, 1), (8, 7), (12, 13), (64, 160), (160, 64)])
def test_hf_to_t2_transcode_equals_unpack_then_pack(shape):
    """The converter's byte-to-byte HF → t2 transcoder against the independent numpy t2 decoder."""
    from bitnet158.formats.ternary import hf_to_t2, pack_hf

    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    t = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
    t2 = hf_to_t2(pack_hf(t))
    assert t2.shape == (shape[0], (shape[1] + 3) // 4) and t2.dtype == torch.uint8
    assert np.array_equal(decode_t2(t2.numpy(), shape[1]), t.numpy())
    if shape[1] % 4:  # padding fields are code 1 (zero)
        pad = (t2[:, -1].numpy() >> (2 * (shape[1] % 4))) & ((1 << (2 * (4 - shape[1] % 4))) - 1)
        assert np.all(pad == int("01" * (4 - shape[1] % 4), 2))


def test_load_hf_source_packed_gives_codes(ms_packed_bitlinear):
    with load_hf_source(str(ms_packed_bitlinear.path)) as hf:
        for name, kind, load in hf.tensors():
            if kind == "linear":
                t, s = load()
                want_t, want_s = ms_packed_bitlinear.ternary[name]
                assert torch.equal(t, want_t) and s == want_s, name


def test_sentencepiece_missing_is_a_clear_error(onebitllm_ckpt, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sentencepiece" else real(name, *a))
    with pytest.raises(ConversionError, match=r"pip install 'bitnet158\[sentencepiece\]'"):
        convert(onebitllm_ckpt, tmp_path)



def test_hub_pickle_only_repo(tiny, onebitllm_ckpt, tmp_path, monkeypatch):
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    tiny.offline_hub_cache(src, "tiny-org/pickled", sha, tmp_path, monkeypatch)
    with pytest.raises(ConversionError, match="--allow-pickle"):
        convert("tiny-org/pickled", tmp_path)
    with PackedFile(convert("tiny-org/pickled", tmp_path, allow_pickle=True)) as pf:
        assert pf.config["family"] == "1bitllm" and pf.provenance["revision"] == sha
        assert "pytorch_model.bin" in pf.provenance["files"]


def test_random_model_command(tmp_path):
    # bitnet-convert random: a model of a published shape's widths (here 2B-4T's at 1 layer, 300 ids) that the
    # runtime loads and runs; uniform ternary codes, bf16-representable scales in range, the byte tokenizer; the
    # same seed gives the same tensors and another seed others; bad options are one error line and write nothing
    from bitnet158.converter.random_model import SHAPES, tensor_specs
    from bitnet158.runtime import load

    runner = CliRunner()
    out = tmp_path / "r.bin"
    r = runner.invoke(main, ["random", "2b4t", "-o", str(out), "--layers", "1", "--vocab", "300", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "hidden 2560, intermediate 6912, 1 layers, 20/5 heads of 128, vocab 300" in r.output
    want = dict(SHAPES["2b4t"], num_hidden_layers=1, vocab_size=300)
    with PackedFile(out) as pf:
        assert pf.config == want
        assert list(pf.tensors) == [s.name for s in tensor_specs(want)]
        pf.verify()
        codes = torch.cat([pf.ternary(n)[0].flatten() for n, i in pf.tensors.items() if i.dtype == "t2"]).long()
        fields = torch.stack([(codes >> (2 * k)) & 3 for k in range(4)]).flatten()
        share = torch.bincount(fields, minlength=4).double() / fields.numel()  # t2 codes 0, 1, 2 = -1, 0, +1
        assert share[3] == 0 and bool(((share[:3] - 1 / 3).abs() < 0.01).all()), share
        scales = torch.cat([pf.torch(n) for n in pf.tensors if n.endswith("_scale")])
        assert torch.equal(scales, scales.bfloat16().float()) and bool(((scales >= 0.025) & (scales < 0.075)).all())
        first = {n: pf.torch(n).clone() for n in pf.tensors}
    model = load(str(out), device="cpu")
    assert model.tokenizer.encode("hi", add_special_tokens=True)[0] == 1  # BOS, then one id a byte
    ids = list(model.generate_ids(model.tokenizer.encode("hi", add_special_tokens=True), max_new_tokens=3, stop_ids=[]))
    assert len(ids) == 3 and all(0 <= i < 300 for i in ids)
    # and its I2_S export (the tokenizer has merges, which GGUF needs) is the same model, token for token
    from bitnet158.converter.gguf_convert import packed_to_gguf

    packed_to_gguf(out, tmp_path / "r.gguf", qtype="i2_s")
    exported = load(str(tmp_path / "r.gguf"), device="cpu")
    text = "the theme in the thin hen"
    assert exported.tokenizer.encode(text, add_special_tokens=True) == model.tokenizer.encode(text, add_special_tokens=True)
    with torch.inference_mode():
        tokens = torch.tensor([model.tokenizer.encode(text, add_special_tokens=True)])
        for m in (model, exported):
            m.net.setup_cache(1, tokens.shape[1])
        logits = [m.net(tokens, 0)[0, -1] for m in (model, exported)]
    # the same codes and scales; token_embd is F16 in the GGUF, which rounds a few tiny bf16 values
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
    for seed, same in (("0", True), ("1", False)):
        again = tmp_path / f"seed{seed}.bin"
        args = ["random", "2b4t", "-o", str(again), "--layers", "1", "--vocab", "300", "--seed", seed, "--no-progress"]
        assert runner.invoke(main, args).exit_code == 0
        with PackedFile(again) as pf:
            assert all(torch.equal(pf.torch(n), t) for n, t in first.items()) == same
    before = out.read_bytes()
    # (a billion layers took minutes of Python before the file's size was refused)
    for args, message in ((["--layers", "0"], r"layers must be in \[1, 1024\]"), (["--layers", str(10**9)], "got 10+$"),
                          (["--vocab", "262"], r"\[263, 4194304\].*got 262"),
                          (["--vocab", str(1 << 40)], r"\[263, 4194304\]"),
                          ([], "exists")):  # fmt: skip
        r = runner.invoke(main, ["random", "1bitllm-large", "-o", str(out), "--no-progress", *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and re.search(message, r.output), r.output
    assert out.read_bytes() == before
    r = runner.invoke(main, ["random", "7b", "-o", str(tmp_path / "x.bin")])
    assert r.exit_code == 2 and not (tmp_path / "x.bin").exists()
    r = runner.invoke(main, ["random", "2b4t", "-o", str(tmp_path / "x.bin"), "--seed", str(2**64)])  # torch's: 64 bits
    assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output and not (tmp_path / "x.bin").exists()
    # the API behind the command refuses what click's choices keep from it
    from bitnet158.converter.random_model import RandomModelError, model_config, write_random_model

    with pytest.raises(RandomModelError, match="unknown shape '7b' \\(known: 2b4t, 1bitllm-large\\)"):
        model_config("7b")
    small = model_config("2b4t", 1, 300)
    for config, kw, message in ((small, {"embed_dtype": "f16"}, r"must be one of \('bf16', 'f32'\), got 'f16'"),
                                ({**small, "tie_word_embeddings": False}, {}, "random models have a tied head")):
        with pytest.raises(RandomModelError, match=message):
            write_random_model(tmp_path / "y.bin", config, progress=False, **kw)
    assert not (tmp_path / "y.bin").exists()


# --- configs the runtime refuses, hostile inputs, the hub cache first, added tokens past the embedding ------------
@pytest.mark.parametrize("change,message", [
    ({"max_position_embeddings": (1 << 22) + 1}, r"max_position_embeddings=4194305 is outside \[1, 4194304\]"),
    ({"original_max_position_embeddings": 1 << 23, "rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     r"rope_scaling.original_max_position_embeddings=8388608 is outside \[1, 4194304\]"),
])
def test_a_config_the_runtime_refuses_is_refused_at_conversion(llama_bitnet_ckpt, tmp_path, change, message):
    # the converter checks the config it writes with the runtime's own validation (formats/config.py): a
    # ConversionError naming the field, before any weight is read, and no file
    src = copy_ckpt(llama_bitnet_ckpt, tmp_path)
    edit_json(src / "config.json", **change)
    with pytest.raises(ConversionError, match=rf"^config.json: {message}"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "src"]  # no temp file either


@pytest.mark.parametrize("weight_map,message", [
    ({"model.embed_tokens.weight": 5}, "maps model.embed_tokens.weight to 5, not a file name"),
    ({"model.embed_tokens.weight": ["model.safetensors"]}, r"maps \S+ to \['model.safetensors'\], not a file name"),
    ({"model.embed_tokens.weight": "model.safetensors", "x": 5}, "maps x to 5, not a file name"),
])
@pytest.mark.parametrize("pickled", [False, True])
def test_an_index_whose_file_names_are_not_strings_is_refused(onebitllm_ckpt, tmp_path, weight_map, message, pickled):
    # once a TypeError traceback (sorted() over mixed types, a path joined with a list)
    src = copy_ckpt(onebitllm_ckpt, tmp_path)
    index = "pytorch_model.bin.index.json" if pickled else "model.safetensors.index.json"
    if pickled:
        (src / "model.safetensors").unlink()
    (src / index).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match=rf"^{re.escape(index)}: weight_map {message}"):
        convert(src, tmp_path, allow_pickle=pickled)
    assert not (tmp_path / "out.bnp").exists()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_latent_is_refused(ms_latent, tmp_path, dtype):
    # torch.aminmax (the finiteness check) has no float8 kernel: once a NotImplementedError traceback
    src = copy_ckpt(ms_latent, tmp_path)
    q = "model.layers.0.self_attn.q_proj.weight"
    state = load_file(str(src / "model.safetensors"))
    _add_tensor(src, q, state[q].to(dtype))
    with pytest.raises(ConversionError, match=rf"q_proj.weight: expected a float latent weight, found {dtype}"):
        convert(src, tmp_path)
    assert not (tmp_path / "out.bnp").exists()


def test_a_hub_error_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(*a, **kw):
        raise LocalEntryNotFoundError("Got: ConnectError\nAn error happened while trying to locate the files.\n\n"
                                      "Please check your internet connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ConversionError) as e:
        convert("tiny-org/unreachable", tmp_path)
    assert str(e.value) == ("tiny-org/unreachable: cannot fetch it from the hub (LocalEntryNotFoundError: Got: "
                            "ConnectError An error happened while trying to locate the files. Please check your "
                            "internet connection.)")


def test_an_added_special_token_past_the_embedding_is_dropped(llama_bitnet_ckpt, tmp_path, caplog):
    # a named special token the vocabulary lacks (pad_token "<pad>"): transformers appends it at id vocab_size, past
    # the embedding, and loads the model; the converter once refused it. It is dropped from the stored tokenizer with
    # one warning, and the runtime loads the file (it refuses a tokenizer with an id past its embedding).
    from bitnet158.runtime import load
    from transformers import AutoTokenizer

    src = copy_ckpt(llama_bitnet_ckpt, tmp_path)
    edit_json(src / "tokenizer_config.json", pad_token="<pad>")
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert AutoTokenizer.from_pretrained(str(src)).pad_token_id == vocab
    with caplog.at_level("WARNING", logger="bitnet158.converter.hf"):
        out = convert(src, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if "past the embedding" in r.getMessage()]
    assert len(warnings) == 1 and "<pad>" in warnings[0] and str(vocab) in warnings[0], warnings
    with PackedFile(out) as pf:
        tok = json.loads(pf.tokenizer["tokenizer_json"])
        assert "<pad>" not in {t["content"] for t in tok["added_tokens"]}
        assert "pad_token" not in pf.tokenizer["special_tokens"]
        _roundtrip(src, pf, ["Hello world", "</s> inside"])
    model = load(str(out), device="cpu")
    assert max(model.tokenizer.encode("Hello <pad>")) < vocab
