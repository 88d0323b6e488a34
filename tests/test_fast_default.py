"""The fast path as the default on CUDA: load()'s dispatch, the CLI flags, and the triton model against the
reference on a tiny converted model (on the CPU through Triton's interpreter, which tests/conftest.py switches on
before anything imports Triton). Tests marked ``gpu`` run the real default on a CUDA device."""

from __future__ import annotations

import logging

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without CUDA the kernels run in the interpreter (tests/conftest.py)
triton = pytest.importorskip("triton")

from bitnet158.converter.hf import convert_hf
from bitnet158.runtime import load
from bitnet158.runtime.api import BitNetModel
from bitnet158.runtime.cli import main as cli_main
from bitnet158.runtime.fast import FastModel
from bitnet158.runtime.generate import GenerationStats
from bitnet158.runtime.loader import DeviceError
from click.testing import CliRunner

needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
PROMPT = [1, 5, 9, 2, 7]
N_NEW = 16 if HAS_CUDA else 6  # every interpreted decode step costs seconds on the CPU


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("fastdef")
    ckpt = tiny.microsoft_latent(folder / "hf")
    out = folder / "tiny.bin"
    convert_hf(str(ckpt.path), str(out), dtype="f32", progress=False)
    return str(out)


def _greedy(model, n=16, **kw):
    stats = GenerationStats()
    ids = list(model.generate_ids(PROMPT, n, stop_ids=(), stats=stats, **kw))
    return ids, stats


# --- dispatch ---------------------------------------------------------------------------------------------------
def test_cpu_load_without_torch_compile_is_reference(tiny_file, monkeypatch, caplog):
    # the CPU fast path (tests/test_cpu_fast.py) needs torch.compile; TORCHDYNAMO_DISABLE=1 turns it off, also for
    # a model large enough that it would compile by default (the threshold lowered under the tiny model's size)
    from bitnet158.runtime import cpu, loader

    monkeypatch.setattr(loader, "CPU_COMPILE_MIN_WEIGHTS", 1000)
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")
    cpu.unavailable_reason.cache_clear()
    with caplog.at_level(logging.WARNING, logger="bitnet158.runtime.loader"):
        model = load(tiny_file, device="cpu")
    cpu.unavailable_reason.cache_clear()  # recomputed once monkeypatch restores the environment
    assert model.fast is None and model.backend == "reference"
    assert "the compiled CPU path is unavailable (TorchDynamo is disabled (TORCHDYNAMO_DISABLE=1))" in caplog.text
    _, stats = _greedy(model, 3)
    assert stats.path == "reference"


def test_int8_head_refused_off_the_fast_path(tiny_file, monkeypatch):
    # without TorchDynamo the compiled CPU path that the int8 head turns on is unavailable: one error that says why
    from bitnet158.runtime import cpu

    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "TorchDynamo is disabled (TORCHDYNAMO_DISABLE=1)")
    with pytest.raises(DeviceError, match="head 'int8' needs a fast path.*compiled CPU path is unavailable .*Dynamo"):
        load(tiny_file, device="cpu", head="int8")
    with pytest.raises(DeviceError, match="head 'int8' needs a fast path.*compiling is off"):
        load(tiny_file, device="cpu", head="int8", compile_cpu=False)
    with pytest.raises(DeviceError, match="unknown head"):
        load(tiny_file, device="cpu", head="fp8")


def test_cli_flags(tiny_file):
    runner = CliRunner()
    r = runner.invoke(
        cli_main,
        [tiny_file, "-p", "Hello", "-n", "4", "--device", "cpu", "--head", "int8", "--no-compile"],
    )
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: head 'int8' needs a fast path (CUDA with triton, or the compiled CPU path), but compiling is off"
        " (--no-compile)"
    ]
    r = runner.invoke(
        cli_main,
        [tiny_file, "-p", "Hello", "-n", "4", "--device", "cpu", "--reference"],
    )
    assert r.exit_code == 0, r.output
    assert "path:             reference" in r.output


# --- the triton model against the reference (interpreter on the CPU) ---------------------------------------------
@pytest.fixture(scope="module")
def ref_model(tiny_file):
    return load(tiny_file, device="cpu" if not HAS_CUDA else "cuda", reference=True)


def test_triton_backend_logits_match_reference(tiny_file, ref_model):
    model = load(tiny_file, device=ref_model.device, backend="triton")
    assert model.fast is None and model.backend == "triton"
    ids = PROMPT + [11, 3, 4]
    ref = ref_model.logits(ids)
    got = model.logits(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_load_builds_the_triton_fast_model(tiny_file, ref_model, monkeypatch):
    # build_model's own wiring of the CUDA default (it once passed the head tensor as FastModel's head mode)
    from bitnet158.runtime import loader

    monkeypatch.setattr(loader, "fast_backend", lambda *a, **k: "triton")
    model = load(tiny_file, device=ref_model.device)
    assert model.fast is not None and model.fast.backend == "triton" and model.fast.head == "bf16"
    ids = PROMPT + [11, 3, 4]
    torch.testing.assert_close(model.logits(ids), ref_model.logits(ids), rtol=1e-4, atol=1e-4)


def test_fast_model_logits_generation_and_stops(tiny_file, ref_model):
    # the same BitNetModel the CUDA default builds, with the decode steps run eagerly where there is no CUDA
    base = load(tiny_file, device=ref_model.device, reference=True)
    model = BitNetModel(base.net, base.tokenizer, base.config, FastModel(base.net, head="bf16"))
    ids = PROMPT + [11, 3, 4]
    torch.testing.assert_close(model.logits(ids), ref_model.logits(ids), rtol=1e-4, atol=1e-4)
    want, _ = _greedy(ref_model, N_NEW)
    got, stats = _greedy(model, N_NEW)
    assert got == want
    assert stats.path == ("triton + CUDA graph" if HAS_CUDA else "triton + device sampling")
    assert (stats.prompt_tokens, stats.generated_tokens, stats.stop_reason) == (
        len(PROMPT),
        N_NEW,
        "length",
    )
    assert stats.token_ids == want and stats.prefill_s > 0 and stats.decode_s > 0
    # a stop id ends the stream before it, even mid-chunk (the device ran ahead): nothing past it comes out
    stop = want[3]
    cut = want.index(stop)
    stats = GenerationStats()
    got = list(model.generate_ids(PROMPT, N_NEW, stop_ids=(stop,), stats=stats))
    assert got == want[:cut] and stats.stop_reason == "eos" and stats.generated_tokens == cut
    assert stats.decode_steps >= cut  # the stop id's step and the run-ahead's, all of them timed
    # a stop string: the text stops before it, as on the reference path
    text = "".join(ref_model.generate("Hello", N_NEW))
    stop_text = text[len(text) // 2 :][:2]
    assert stop_text
    want_text = "".join(ref_model.generate("Hello", N_NEW, stop=[stop_text]))
    stats = GenerationStats()
    assert "".join(model.generate("Hello", N_NEW, stop=[stop_text], stats=stats)) == want_text
    assert stats.stop_reason == "stop string" and len(want_text) < len(text)


# --- the real default on a GPU ----------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_cuda_default_is_graph_path_and_matches_reference(tiny_file):
    ref = load(tiny_file, device="cuda", dtype="f32", reference=True)
    fast = load(tiny_file, device="cuda", dtype="f32")
    assert ref.fast is None and fast.fast is not None and fast.backend == "triton"
    want, ref_stats = _greedy(ref, 16)
    got, stats = _greedy(fast, 16)
    assert got == want
    assert ref_stats.path == "reference" and stats.path == "triton + CUDA graph"
    assert stats.generated_tokens == 16 and stats.decode_tok_s > 0
