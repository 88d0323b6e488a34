"""bitnet-compare: identical models agree exactly, a flipped tensor fails the thresholds, JSON parses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from bitnet158.compare.cli import EXIT_THRESHOLD, main
from bitnet158.compare.core import CompareError, compare_models, logit_stats, perplexity_from_logits
from bitnet158.converter.hf import convert_hf
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
                       ("--max-kl", "-1"), ("--min-top1", "nan")):  # fmt: skip
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
