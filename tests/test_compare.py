"""bitnet-compare: identical models agree exactly, a flipped tensor fails the thresholds, JSON parses; the
transformers engine runs each family as BitNet and agrees with our files."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bitnet158.compare.cli import EXIT_THRESHOLD, main
from bitnet158.compare.core import CompareError, compare_models, logit_stats, perplexity_from_logits
from bitnet158.converter.hf import convert_hf
from bitnet158.formats.packed import PackedFile
from bitnet158.runtime import load

PROMPT = "Hello world! The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def packed(ms_packed_auto, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "ms.bin"
    convert_hf(str(ms_packed_auto.path), str(out), progress=False)
    return out


def _flip(spec, data, tensor: str = "layers.0.mlp.down_proj.weight"):
    """rewrite_packed's edit: one ternary tensor negated (code c -> 2 - c)."""
    if spec.name == tensor:
        fields = [(data >> (2 * k)) & 3 for k in range(4)]
        data = sum(((2 - f) & 3) << (2 * k) for k, f in enumerate(fields)).to(torch.uint8)
    return spec, data


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_logit_stats_against_numpy():
    g = torch.Generator().manual_seed(0)
    la, lb = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    max_abs, kl, top1 = logit_stats(la, lb)
    a, b = la.double().numpy(), lb.double().numpy()
    pa = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    np.testing.assert_allclose(kl.numpy(), (pa * np.log(pa / pb)).sum(-1), rtol=1e-12)
    assert max_abs == pytest.approx(np.abs(a - b).max())
    assert top1 == pytest.approx(float((a.argmax(-1) == b.argmax(-1)).mean()))
    ids = [3, 1, 4, 1, 5]
    nll = -np.mean([np.log(pa[i, ids[i + 1]]) for i in range(4)])
    assert perplexity_from_logits(la, ids) == pytest.approx(math.exp(nll), rel=1e-12)


def test_identical_files_zero_deltas(packed, tmp_path):
    copy = tmp_path / "copy.bin"
    shutil.copy(packed, copy)
    r = _run(packed, copy, "--prompt", PROMPT, "--json", "--max-kl", "0", "--min-top1", "1", "--gen-tokens", "6")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["max_abs_logit_diff"] == 0.0 and out["mean_kl"] == 0.0 and out["max_kl"] == 0.0
    assert out["top1_agreement"] == 1.0 and out["ppl_a"] == out["ppl_b"] and out["ppl_a"] > 1
    assert out["divergence"]["first_diff"] is None and len(out["divergence"]["ids_a"]) == 6
    assert out["violations"] == [] and out["n_tokens"] > 5 and not out["tokenizer_mismatch"]


def test_flipped_tensor_fails_thresholds(packed, tmp_path, tiny):
    bad = tmp_path / "flipped.bin"
    tiny.rewrite_packed(packed, bad, _flip)
    r = _run(packed, bad, "--prompt", PROMPT, "--max-kl", "1e-6", "--min-top1", "0.999", "--gen-tokens", "4")
    assert r.exit_code == EXIT_THRESHOLD, r.output
    assert "FAIL: mean KL" in r.output and "max |Δlogit|" in r.output and "perplexity A" in r.output
    r = _run(packed, bad, "--prompt", PROMPT, "--json", "--gen-tokens", "0")
    assert r.exit_code == 0  # no threshold given: report only
    out = json.loads(r.stdout)
    assert out["max_abs_logit_diff"] > 0 and out["mean_kl"] > 0 and out["divergence"] is None


def test_hf_folder_converted_in_memory(packed, ms_packed_auto, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(PROMPT * 2, encoding="utf-8")
    r = _run(ms_packed_auto.path, packed, "--text", text, "--json", "--max-kl", "0", "--gen-tokens", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_abs_logit_diff"] == 0.0
    assert not list(Path(ms_packed_auto.path).glob("*.bin"))  # nothing left beside the source


def test_hub_id_converted_in_memory(tiny, packed, ms_packed_auto, tmp_path, monkeypatch):
    # a hub id (here from an offline cache) is fetched and converted like a folder
    tiny.offline_hub_cache(ms_packed_auto.path, "tiny-org/tiny-bitnet", "ab" * 20, tmp_path, monkeypatch)
    r = _run("tiny-org/tiny-bitnet", packed, "--prompt", PROMPT, "--json", "--max-kl", "0", "--gen-tokens", "2")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_abs_logit_diff"] == 0.0
    r = _run("tiny-org/not-cached", packed, "--prompt", PROMPT)
    assert r.exit_code == 1 and "tiny-org/not-cached" in r.output and "Traceback" not in r.output
    # a missing local model file is not a repository id, whatever its shape: never sent to the hub
    for missing in ("models/x.gguf", "models/x.bin"):
        r = _run(packed, missing, "--prompt", PROMPT)
        assert r.exit_code == 1 and f"cannot read {missing}: No such file or directory" in r.output, r.output


def test_json_is_strict_when_the_logits_overflow(packed, tmp_path, tiny):
    # a model whose final norm holds an inf: its figures are null in the JSON, never NaN or Infinity
    bad = tmp_path / "inf.bin"
    tiny.rewrite_packed(packed, bad, lambda sp, t: (sp, t.index_fill(0, torch.tensor([0]), float("inf")))
                        if sp.name == "norm.weight" else (sp, t))  # fmt: skip
    r = _run(packed, bad, "--prompt", PROMPT, "--json", "--gen-tokens", "0")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert out["mean_kl"] is None and out["ppl_a"] > 1


def test_activation_override_changes_logits(packed):
    r = _run(packed, packed, "--prompt", PROMPT, "--json", "--activation-b", "silu", "--gen-tokens", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mean_kl"] > 0


def test_errors_are_one_line(packed, tmp_path):
    r = _run(packed, tmp_path / "missing.bin")
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output
    r = _run(packed, packed, "--prompt", "x", "--text", packed)
    assert r.exit_code == 2
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00text")
    r = _run(packed, packed, "--text", binary)
    assert r.exit_code == 1 and r.output == f"error: {binary} is not UTF-8 text (byte 0: invalid start byte)\n"
    # numbers out of range are usage errors (NaN too, which click's FloatRange lets through)
    for opt, value in (("--max-tokens", "0"), ("--max-tokens", "-5"), ("--gen-tokens", "-1"), ("--max-kl", "nan"),
                       ("--max-kl", "-1"), ("--min-top1", "nan"), ("--max-ppl-diff", "-0.1"),
                       ("--max-ppl-diff", "nan")):  # fmt: skip
        r = _run(packed, packed, opt, value)
        assert r.exit_code == 2 and opt in r.output, (opt, value, r.output)


def test_vocab_mismatch_and_no_tokens_refused(packed):
    class M:
        def __init__(self, v):
            self.config = type("C", (), {"vocab_size": v})()

    with pytest.raises(CompareError, match="vocab sizes differ"):
        compare_models(M(10), M(12), "hi")
    model = load(packed, device="cpu")
    with pytest.raises(CompareError, match="the text tokenizes to no tokens"):
        compare_models(model, model, PROMPT, max_tokens=0)
    res = compare_models(model, model, PROMPT, max_tokens=1, max_ppl_diff=0.5, gen_tokens=0)
    assert res.ppl_a is None and res.violations == ["--max-ppl-diff needs a text of two tokens or more"]


def test_a_tokenizer_that_differs_fails_a_threshold(packed, tmp_path, tiny):
    # B's tokenizer swaps two tokens' ids: the logits on A's ids agree exactly, but B would not see those ids
    # from this text. With a threshold (or --trace) that is a violation; B's greedy ids are shown as B's
    # tokenizer prints them
    model = load(packed, device="cpu")
    tj = json.loads(model.tokenizer._tok.to_str())
    vocab = tj["model"]["vocab"]
    ids = model.tokenizer.encode(PROMPT, add_special_tokens=False)
    x, y = (next(w for w, i in vocab.items() if i == t) for t in sorted(set(ids))[:2])
    vocab[x], vocab[y] = vocab[y], vocab[x]
    swapped = tmp_path / "swapped.bin"
    with PackedFile(packed) as pf:
        tiny.rewrite_packed(packed, swapped, tokenizer={**pf.tokenizer, "tokenizer_json": json.dumps(tj)})
    other = load(swapped, device="cpu")
    res = compare_models(model, other, PROMPT, gen_tokens=4)
    assert res.tokenizer_mismatch and res.mean_kl == 0 and res.violations == []  # reported, no threshold
    res = compare_models(model, other, PROMPT, gen_tokens=4, max_kl=1.0)
    assert res.violations == [f"B's tokenizer gives other ids for this text ({len(ids) + 1} tokens against A's "
                              f"{len(ids) + 1}); both ran on A's"]  # fmt: skip
    assert res.divergence.text_b == other.tokenizer.decode(res.divergence.ids_b)


def test_text_is_cut_to_the_context(packed):
    """A text longer than the context is compared over what fits with the greedy continuation after it (the tiny
    model's context: 256 tokens); a continuation longer than the context is refused."""
    model = load(packed, device="cpu")
    assert model.config.max_position_embeddings == 256
    long = PROMPT * 40
    assert len(model.tokenizer.encode(long)) > 256
    res = compare_models(model, model, long, gen_tokens=5, max_tokens=1024)
    assert res.n_tokens == 252 and res.divergence.first_diff is None and res.max_abs_logit_diff == 0
    assert compare_models(model, model, long, gen_tokens=0).n_tokens == 256
    assert compare_models(model, model, long, gen_tokens=5, max_tokens=100).n_tokens == 100
    with pytest.raises(CompareError, match="257 greedy tokens leave no room for the text in a context of 256"):
        compare_models(model, model, long, gen_tokens=257)


# ----------------------------------------------------------------------------------------------------------------
# --engine transformers: the checkpoint run by transformers' own model class (compare/reference.py)
def _transformers_logits(folder, ids) -> torch.Tensor:
    """A plain from_pretrained of a folder that already says everything (conftest's references), in fp32."""
    from transformers import AutoModelForCausalLM

    from bitnet158.compare.reference import cast_float32

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    cast_float32(model)
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def _quantization_config(src: Path, dst: Path, qc: dict | None) -> Path:
    """A copy of the checkpoint src whose config.json has the quantization_config qc (None: none at all)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.pop("quantization_config")
    if qc is not None:
        cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


OFFLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}


@pytest.mark.parametrize("family", ["ms_packed_auto", "ms_packed_bitlinear", "ms_latent", "ms_latent_no_qc",
                                    "ms_latent_offline_qc", "onebitllm", "llama_bitnet"])
def test_transformers_engine_runs_each_family_as_bitnet(family, request, tiny, tmp_path, caplog):
    """The engine's logits equal transformers' on a folder that spells out how to run the checkpoint as BitNet:
    as it is for the packed and Llama-BitNet forms and a latent one with an online quantization_config; for a
    latent one with none or an offline one, the same latent checkpoint with transformers' online one (and a
    warning); for 1bitLLM, conftest's rewrite as BitNetForCausalLM (renamed sub-norms, SiLU, rope theta, online
    quantization; REFERENCE §4). Loaded as they are, the latent ones without the online config and the 1bitLLM
    one are other networks (no quantization, or packed codes read from floats; a plain Llama without sub-norms)."""
    from bitnet158.compare.reference import load_transformers

    fixture = {"ms_latent_no_qc": "ms_latent", "ms_latent_offline_qc": "ms_latent", "onebitllm": "onebitllm_ckpt",
               "llama_bitnet": "llama_bitnet_ckpt"}
    ckpt = request.getfixturevalue(fixture.get(family, family))
    src, reference = ckpt.path, ckpt.path
    if family == "ms_latent_no_qc":
        src = _quantization_config(ckpt.path, tmp_path / "no_qc", None)
    elif family == "ms_latent_offline_qc":
        src = _quantization_config(ckpt.path, tmp_path / "offline_qc", OFFLINE)
    elif family == "onebitllm":
        reference = tiny.onebitllm_as_transformers(ckpt, tmp_path / "as_bitnet")
    with caplog.at_level(logging.WARNING, logger="bitnet158.compare.reference"):
        engine = load_transformers(str(src), torch.device("cpu"))
    assert ("holds float master weights" in caplog.text) == family.startswith("ms_latent_"), caplog.text
    ids = engine.tokenizer.encode(PROMPT)
    want = _transformers_logits(reference, ids)
    torch.testing.assert_close(engine.logits(ids), want, rtol=0, atol=0)
    if src != reference:
        assert not torch.allclose(_transformers_logits(src, ids), want, atol=1e-3)  # as it is: another network


def test_transformers_engine_against_our_file(packed, ms_packed_auto, onebitllm_ckpt, tmp_path):
    """bitnet-compare FILE CHECKPOINT --engine-b transformers (or the other way round): our converted file
    against transformers on its source agrees to float rounding on these short texts (fp32 on both sides)."""
    r = _run(packed, ms_packed_auto.path, "--engine-b", "transformers", "--prompt", PROMPT, "--json",
             "--max-kl", "1e-6", "--min-top1", "1", "--gen-tokens", "8")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["engine_a"] == "bitnet158" and out["engine_b"] == "transformers"
    assert out["max_abs_logit_diff"] < 1e-4 and out["divergence"]["first_diff"] is None
    assert not out["tokenizer_mismatch"]  # AutoTokenizer and the file's tokenizer agree on the text

    ob = tmp_path / "ob.bin"
    convert_hf(str(onebitllm_ckpt.path), str(ob), dtype="f32", progress=False)
    r = _run(onebitllm_ckpt.path, ob, "--engine-a", "transformers", "--prompt", PROMPT, "--max-kl", "1e-6",
             "--min-top1", "1", "--gen-tokens", "4")
    assert r.exit_code == 0, r.output
    assert f"{onebitllm_ckpt.path} (transformers)" in r.output and "never (identical)" in r.output


DEMO = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory, tiny) -> tuple[Path, Path]:
    """The demo model converted with its f32 tensors kept (so that it is as precise as its checkpoint), and a
    copy with every sub-norm's weight set to 1: a port's kind of mistake."""
    ours = tmp_path_factory.mktemp("demo") / "demo.bin"
    convert_hf(str(DEMO / "tiny-bitnet"), str(ours), dtype="f32", progress=False)

    def ones(spec, data):
        return (spec, torch.ones_like(data)) if "sub_norm" in spec.name else (spec, data)

    broken = ours.with_name("broken.bin")
    tiny.rewrite_packed(ours, broken, ones)
    return ours, broken


def test_transformers_engine_on_the_trained_demo_model(demo_files):
    """The demo model (trained, so its logits have real margins) on its held-out text, as far as its context
    goes: our file against transformers differs by int8 rounding flips only (a float order that differs puts an
    activation at k + 1/2 on the other side; its key and value then move the later positions a little: measured
    mean KL 1.6e-4, top-1 99.6 %, perplexities 0.1 % apart). A file with the sub-norms' weights set to 1, a port's
    kind of mistake, is far outside that (KL 0.29, top-1 78 %, perplexity 21 % higher): the same thresholds fail
    it."""
    ours, broken = demo_files
    args = ("--engine-b", "transformers", "--text", DEMO / "heldout.txt", "--max-kl", "1e-2", "--min-top1", "0.98",
            "--max-ppl-diff", "0.01", "--json")
    r = _run(ours, DEMO / "tiny-bitnet", *args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_tokens"] == 241 and out["divergence"]["first_diff"] is None  # 256 positions, 16 greedy tokens
    assert abs(out["ppl_a"] / out["ppl_b"] - 1) < 0.005
    r = _run(broken, DEMO / "tiny-bitnet", *args)
    assert r.exit_code == EXIT_THRESHOLD, r.output
    out = json.loads(r.stdout)
    assert out["mean_kl"] > 0.1 and out["top1_agreement"] < 0.9, out
    assert len(out["violations"]) == 3 and out["violations"][2].startswith("perplexities differ by 2")  # 21 %


def test_transformers_engine_takes_a_hub_id(packed, ms_packed_auto, tiny, tmp_path, monkeypatch):
    tiny.offline_hub_cache(ms_packed_auto.path, "tiny-org/tiny-bitnet", "cd" * 20, tmp_path, monkeypatch)
    r = _run(packed, "tiny-org/tiny-bitnet", "--engine-b", "transformers", "--prompt", PROMPT, "--json",
             "--min-top1", "1", "--gen-tokens", "0")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["max_abs_logit_diff"] < 1e-4


def test_transformers_engine_refusals(packed, ms_packed_auto, monkeypatch):
    """One error line each: a file (packed or GGUF) for the transformers engine, an activation override with it,
    an unknown engine (API), transformers missing, transformers failing to load."""
    from bitnet158.compare.core import open_model

    r = _run(packed, packed, "--engine-b", "transformers")
    assert r.exit_code == 1 and r.output == (f"error: {packed}: the transformers engine runs an HF checkpoint (a "
                                             "folder or a hub id org/name), not a file\n")
    r = _run(packed, ms_packed_auto.path, "--engine-b", "transformers", "--activation-b", "silu")
    assert r.exit_code == 1 and "an activation override applies to the bitnet158 engine" in r.output
    with pytest.raises(CompareError, match="engine must be one of"):
        with open_model(str(packed), engine="llama.cpp"):
            pass
    import transformers

    def refuse(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    r = _run(packed, ms_packed_auto.path, "--engine-b", "transformers")
    assert r.exit_code == 1 and r.output == (f"error: transformers cannot load {ms_packed_auto.path}: OSError: no "
                                             "space left on device\n")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    r = _run(packed, ms_packed_auto.path, "--engine-b", "transformers")
    assert r.exit_code == 1 and "needs transformers and accelerate: pip install 'bitnet158[reference]'" in r.output


# ----------------------------------------------------------------------------------------------------------------
# --trace (compare/trace.py): rounding flips told from a real difference
def test_trace_walk_on_made_up_inputs():
    """walk's verdicts on two linears' inputs [T=3, K=4]: equal inputs agree; an input at a rounding tie that only
    one side rounds up, then a large difference at and after that position only, is rounding; a difference at a
    position no flip has reached differs; inputs of other linears are refused."""
    from bitnet158.compare.trace import walk

    base = torch.tensor([[127.0, 1.0, -3.0, 2.0], [127.0, 10.0, 5.0, -7.0], [127.0, 0.0, 1.0, 4.0]])
    tied = base.clone()
    tied[1, 1] = 10.5  # x·s = 10.5 exactly (max 127): rounds to 10 (half to even) ...
    nudged = tied.clone()
    nudged[1, 1] = 10.500001  # ... and to 11 a float rounding away
    later = base * 1.5
    later_b = later.clone()
    later_b[1:] += 30.0  # far apart at positions 1 and 2, which the flip reached; position 0 equal
    names = ["layers.0.attn.q_proj", "layers.0.attn.o_proj"]
    t = walk(names, [base, later], [base.clone(), later.clone()])
    assert t.verdict == "agree" and t.max_rel == 0 and t.first_flip is None and t.tokens == 3 and t.linears == 2
    assert t.checked == 6 and t.describe().endswith("(6 of 2 linears × 3 positions); no flip")
    t = walk(names, [tied, later], [nudged, later_b])
    assert t.verdict == "rounding" and t.first_flip == "layers.0.attn.q_proj, position 1", t
    assert 0 < t.max_rel < 1e-6 and t.checked == 4  # all 3 positions of q_proj, then position 0 of o_proj
    assert t.describe().endswith("(4 of 2 linears × 3 positions); the first flip at layers.0.attn.q_proj, position 1")
    t = walk(names, [base, later], [base.clone(), later_b])  # the same difference with no flip before it
    assert t.verdict == "differ" and t.differ_at == "layers.0.attn.o_proj, position 1" and t.checked == 3, t
    assert t.to_dict()["summary"].startswith("DIFFER at layers.0.attn.o_proj, position 1: inputs 0.16 apart")
    # three linears: the flip reaches positions >= p of every later linear and never leaves them; the first flip
    # stays the first; a flip at position 0 leaves no position to check
    def tie_at(row: int) -> tuple[torch.Tensor, torch.Tensor]:  # one input that only B rounds up, at row
        a = base.clone()
        a[row, 1] = 10.5
        b = a.clone()
        b[row, 1] = 10.500001
        return a, b

    names3 = [*names, "layers.0.mlp.gate_proj"]
    (a0, b0), (a1, b1) = tie_at(1), tie_at(2)
    t = walk(names3, [a0, a1, later], [b0, b1, later_b])  # later_b: far apart at rows 1-2, which the first flip reached
    assert t.verdict == "rounding" and t.first_flip == "layers.0.attn.q_proj, position 1", t
    # a flip at position 0 leaves no input of any later linear to check: not "rounding", which would rest on none
    # of them (a broken file's trace passed so), but inconclusive, a violation in compare_models; at the last
    # linear it leaves nothing unchecked
    (a0, b0), (a1, b1) = tie_at(2), tie_at(0)
    t = walk(names3, [a0, a1, later], [b0, b1, later + 30])
    assert t.verdict == "inconclusive" and t.first_flip == "layers.0.attn.q_proj, position 2" and t.checked == 5, t
    assert t.blind == "layers.0.mlp.gate_proj"
    a0, b0 = tie_at(0)
    t = walk(names3, [a0, later, later], [b0, later + 30, later - 30])
    assert t.verdict == "inconclusive" and t.checked == 3 and t.blind == "layers.0.attn.o_proj", t
    assert t.describe().startswith("INCONCLUSIVE: rounding flips (the first at layers.0.attn.q_proj, position 0) "
                                   "reached position 0 before layers.0.attn.o_proj, which no input of")
    t = walk(names3, [base, later, a0], [base.clone(), later.clone(), b0])
    assert t.verdict == "rounding" and t.blind is None and t.checked == 9, t
    with pytest.raises(CompareError, match="A ran 1 of 2, B ran 2"):
        walk(names, [base], [base, later])
    with pytest.raises(CompareError, match=r"layers.0.attn.o_proj takes \(3, 4\) in A, \(3, 3\) in B"):
        walk(names, [base, later], [base, later[:, :3]])


def test_trace_tells_rounding_from_a_broken_file(demo_files, ms_packed_auto, packed):
    """--trace on the demo model against transformers: rounding (every input agrees to float rounding until an
    int8 flip); the broken sub-norm file: DIFFER at layer 0's o projection, position 0, the input the sub-norm
    feeds, and exit 3 with no threshold given. Two of our own files: agree."""
    ours, broken = demo_files
    args = ("--engine-b", "transformers", "--text", DEMO / "heldout.txt", "--trace", "--gen-tokens", "0", "--json")
    r = _run(ours, DEMO / "tiny-bitnet", *args)
    assert r.exit_code == 0, r.output
    t = json.loads(r.stdout)["trace"]
    assert t["verdict"] in ("rounding", "agree") and t["max_rel"] < 1e-4 and t["linears"] == 28 and t["tokens"] == 64
    r = _run(broken, DEMO / "tiny-bitnet", *args[:-1])
    assert r.exit_code == EXIT_THRESHOLD, r.output
    assert "FAIL: trace: DIFFER at layers.0.attn.o_proj, position 0" in r.output
    # the checkpoint itself on our side: converted with its f32 floats, as precise as the file above (a bf16
    # conversion rounds the embedding: 5e-3 apart at the first linear, every later input past a flip)
    r = _run(DEMO / "tiny-bitnet", DEMO / "tiny-bitnet", *args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trace"]["max_rel"] < 1e-4, r.output

    r = _run(packed, ms_packed_auto.path, "--trace", "--prompt", PROMPT, "--json", "--gen-tokens", "0")
    assert r.exit_code == 0 and json.loads(r.stdout)["trace"]["verdict"] == "agree", r.output


def test_traced_loads_our_reference_path_in_fp32(packed, monkeypatch):
    """--trace needs our BitLinears to see every input: the fast paths fuse q/k/v and gate/up (CUDA) or compile the
    layer (CPU, large models), and CUDA's default dtype is bf16. So a traced open asks for the plain fp32 network."""
    from bitnet158.compare.core import open_model
    from bitnet158.runtime import loader

    asked = []
    real = loader.build_model
    monkeypatch.setattr(loader, "build_model", lambda source, **kw: asked.append(kw) or real(source, **kw))
    for traced in (False, True):
        with open_model(str(packed), device="cpu", traced=traced):
            pass
    assert [(kw["reference"], kw["dtype"]) for kw in asked] == [(False, None), (True, "f32")]
