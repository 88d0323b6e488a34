"""The compiled CPU fast path (runtime/cpu.py): the GEMV against the reference BitLinear bit for bit, the decode
step against the reference network on the three families, the dispatch in load(), and the fallback when
compiling fails.

The test command sets TORCHDYNAMO_DISABLE=1 (it keeps transformers fast), which also turns this path off; the
``compiled`` fixture lifts it for these tests only."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from bitnet158.converter.hf import convert_hf
from bitnet158.formats.ternary import pack_t2
from bitnet158.runtime import cpu, load
from bitnet158.runtime.bitlinear import BitLinear, int8_head_logits, quantize_activations, quantize_head
from bitnet158.runtime.cli import main as cli_main
from bitnet158.runtime import model as model_module
from bitnet158.runtime.generate import GenerationStats
from bitnet158.runtime.fast import FastModel, FastPathError
from bitnet158.runtime.loader import DeviceError, narrow_dtype
from click.testing import CliRunner

PROMPT = [1, 5, 9, 2, 7, 3]


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile on for one test (the suite runs with TORCHDYNAMO_DISABLE=1)."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    cpu.unavailable_reason.cache_clear()
    why = cpu.unavailable_reason()
    if why is not None and "compiler" in why.lower():
        pytest.skip(why)  # no C++ toolchain on this machine: the fallback test below still runs
    assert why is None, why
    yield
    cpu.unavailable_reason.cache_clear()  # before monkeypatch restores the variable: recomputed on the next call


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory) -> dict[str, str]:
    """One converted tiny model per family (hidden 64, 2 layers, GQA 4/2 heads), f32 floats."""
    root = tmp_path_factory.mktemp("cpufast")
    made = {
        "microsoft": tiny.microsoft_latent(root / "ms"),  # relu², sub-norms, tied head
        "1bitllm": tiny.onebitllm(root / "obl"),  # SiLU, sub-norms
        "llama-bitnet": tiny.llama_bitnet(root / "llama"),  # SiLU, no sub-norms, untied head
    }
    out = {}
    for name, ckpt in made.items():
        out[name] = str(root / f"{name}.bin")
        convert_hf(str(ckpt.path), out[name], dtype="f32", progress=False)
    return out


def test_non_finite_logits_are_one_error(files, tmp_path, tiny, compiled):
    # the compiled step's pick checks the logits as the reference path's Sampler does
    from bitnet158.runtime.sampling import NonFiniteLogitsError

    bad = tmp_path / "nan.bin"
    tiny.rewrite_packed(files["microsoft"], bad, lambda sp, t: (sp, torch.full_like(t, float("nan")))
                        if sp.name == "norm.weight" else (sp, t))  # fmt: skip
    model = load(str(bad), device="cpu", compile_cpu=True)
    for temperature in (0.0, 0.8):
        with pytest.raises(NonFiniteLogitsError):
            list(model.generate_ids(model.tokenizer.encode("Hello"), 4, temperature=temperature))


# --- the prefill GEMM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [cpu.PREFILL_ROWS, 97])
@pytest.mark.parametrize("k", [64, 37])  # 37: padding columns in the last byte
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_equal_reference_bitlinear(m, k, per_row, dtype):
    gen = torch.Generator().manual_seed(m + k + per_row)
    n = 40
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n if per_row else 1, generator=gen) + 0.5
    ref = BitLinear(pack_t2(t), scale, k)
    x = torch.randn(m, k, generator=gen) * 3
    x[0] = torch.tensor([127.0] + [(i % 9) - 4.5 for i in range(k - 1)])  # rounding ties (see the GEMV test)
    x[1] = 0  # max|x| = 0
    x = x.to(dtype)
    got = cpu.bitlinear_rows(x, ref.packed, ref.scale, k)
    assert got.dtype == dtype and torch.equal(got, ref(x))


def test_backend_takes_the_prefill_gemm_from_prefill_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "bitlinear_rows", lambda *a: calls.append(a[0].shape[0]) or torch.zeros(1))
    packed = pack_t2(torch.ones(8, 16, dtype=torch.int8))
    for m in (2, cpu.PREFILL_ROWS - 1, cpu.PREFILL_ROWS, 300):
        cpu.bitlinear_cpu(torch.randn(m, 16), packed, torch.ones(1), 16)
    assert calls == [cpu.PREFILL_ROWS, 300]


# --- the GEMV ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [64, 37])  # 37: padding columns in the last byte
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_equals_reference_bitlinear(compiled, k, per_row, dtype):
    gen = torch.Generator().manual_seed(k + per_row)
    n = 24
    t = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n if per_row else 1, generator=gen) + 0.5
    ref = BitLinear(pack_t2(t), scale, k)
    xs = [torch.randn(k, generator=gen) * 3 for _ in range(20)]
    # rounding ties: max|x| = 127 makes s = 1, so x·s lands exactly on .5 (round half to even)
    xs.append(torch.tensor([127.0] + [(i % 9) - 4.5 for i in range(k - 1)]))
    xs.append(torch.zeros(k))  # max|x| = 0: s = 127 / 1e-5
    for x in xs:
        x = x.to(dtype)
        got = cpu.kernels().bitlinear(x, ref.packed, ref.scale)
        want = ref(x[None])[0]
        assert got.dtype == dtype
        assert torch.equal(got, want), (x, got, want)


def test_gemv_beyond_max_k_uses_the_reference_arithmetic(compiled, monkeypatch):
    k = cpu.MAX_K + 4  # fp32 sums could round beyond MAX_K, so the int32 reference arithmetic runs instead
    t = torch.randint(-1, 2, (3, k), dtype=torch.int8)
    ref = BitLinear(pack_t2(t), torch.ones(1), k)
    x = torch.randn(1, k)
    monkeypatch.setattr(cpu, "kernels", None)  # calling the compiled functions would fail, and not fall back: as if
    monkeypatch.setattr(cpu, "_vec_state", {"ok": {cpu._gemv_key(x, ref.packed, ref.scale)}, "failed": set()})  # ran
    assert torch.equal(cpu.bitlinear_cpu(x, ref.packed, ref.scale, k), ref(x))
    with pytest.raises(ValueError, match=f"the compiled CPU GEMV is exact only for K <= {cpu.MAX_K}, got {k}"):
        cpu._bitlinear(x[0], ref.packed, ref.scale)  # what tracing it at that width would say


# --- the decode step against the reference network ------------------------------------------------------------
@pytest.mark.parametrize("family", ["microsoft", "1bitllm", "llama-bitnet"])
def test_decode_matches_reference(compiled, files, family):
    fast, ref = load(files[family], device="cpu", compile_cpu=True), load(files[family], device="cpu", reference=True)
    assert fast.fast is not None and fast.backend == "cpu" and ref.fast is None
    stats = GenerationStats()
    got = list(fast.generate_ids(PROMPT, 16, stop_ids=(), stats=stats))
    assert stats.path == "cpu + device sampling"
    assert got == list(ref.generate_ids(PROMPT, 16, stop_ids=()))
    # teacher-forced: the logits of every decode step along the reference's sequence
    seq = PROMPT + got
    for m in (fast, ref):
        m.net.setup_cache(1, len(seq))
    with torch.inference_mode():
        a = fast.fast.logits(torch.tensor([PROMPT]), 0)[0, -1]
        b = ref.net(torch.tensor([PROMPT]), 0)[0, -1]
        steps = [(a, b)]
        for pos in range(len(PROMPT), len(seq) - 1):
            tok = torch.tensor([[seq[pos]]])
            steps.append((fast.fast.logits(tok, pos)[0, -1], ref.net(tok, pos)[0, -1]))
    for a, b in steps:
        assert a.argmax() == b.argmax()
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_decode_compiles_the_layer_once(compiled, files):
    # as in a fresh process: torch.compile would specialise the position and the cache length (prompt + new
    # tokens) at the first decode step and compile again when either changes (seconds each at 2B-4T);
    # cpu.symbolic_position() makes the first compile the last
    torch._dynamo.reset()
    model = load(files["microsoft"], device="cpu", compile_cpu=True)
    ref = load(files["microsoft"], device="cpu", reference=True)
    warmups = []
    # the first prompt is shorter than the warm-up's position, whose cache slot the decode steps then rewrite; the
    # second generation needs a longer cache
    for prompt, n in ((PROMPT[:2], 6), (PROMPT, 11)):
        stats = GenerationStats()
        got = list(model.generate_ids(prompt, n, stop_ids=(), stats=stats))
        assert got == list(ref.generate_ids(prompt, n, stop_ids=()))
        warmups.append(stats.warmup_s)
    assert model.net.max_seq == len(PROMPT) + 11
    # the first generation compiled before its prefill (at position 2), timed apart from it; the second did not
    assert warmups[0] > 0 and warmups[1] == 0
    model.fast.logits(torch.tensor([[3]]), 1)  # position 1, the first step after a one-token prompt
    graphs = torch._dynamo.eval_frame._debug_get_cache_entry_list(cpu._layer.__code__)
    assert len(graphs) == 1


def test_a_step_at_position_0_first_still_compiles_the_layer_once_for_all_positions(compiled, files):
    # a one-token prompt runs the compiled step at position 0, which torch.compile specialises (a graph for 0
    # alone); the decode steps after it still compile the layer once with the position symbolic, not once for each
    # position (its shapes are static)
    torch._dynamo.reset()
    model = load(files["microsoft"], device="cpu", compile_cpu=True)
    ref = load(files["microsoft"], device="cpu", reference=True)
    for m in (model, ref):
        m.net.setup_cache(1, 4)
    with torch.inference_mode():
        a, b = model.fast.logits(torch.tensor([[3]]), 0)[0, -1], ref.net(torch.tensor([[3]]), 0)[0, -1]
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert list(model.generate_ids(PROMPT, 8, stop_ids=())) == list(ref.generate_ids(PROMPT, 8, stop_ids=()))
    assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(cpu._layer.__code__)) == 2


def test_models_of_other_shapes_in_one_process(compiled, files, tiny, tmp_path, monkeypatch, caplog):
    # one process, three models of other sizes (with and without GQA, a width not a multiple of 4): each set of
    # shapes compiles its own static graphs, so the head counts stay ints (SDPA wants enable_gqa a bool, not a
    # SymBool), no function runs into Dynamo's recompile limit (8 per function by default: the one-row GEMVs
    # compile 4-5 shapes a model), and nothing falls back to the reference path or raises
    torch._dynamo.reset()
    sizes = {"HIDDEN": [90, 48], "INTERMEDIATE": [77, 64], "HEADS": [5, 2], "KV_HEADS": [1, 2]}
    paths = [files["microsoft"]]  # hidden 64, 4/2 heads
    for i in range(2):
        for name, values in sizes.items():  # conftest's tiny sizes are its module constants
            monkeypatch.setitem(tiny.microsoft_latent.__globals__, name, values[i])
        paths.append(str(tmp_path / f"m{i}.bin"))
        convert_hf(str(tiny.microsoft_latent(tmp_path / f"m{i}", seed=i + 1).path), paths[-1], dtype="f32",
                   progress=False)
    layers = [0]
    for path in paths:
        fast, ref = load(path, device="cpu", compile_cpu=True), load(path, device="cpu", reference=True)
        with caplog.at_level(logging.WARNING):
            # a one-token forward of the plain network: every BitLinear through the one-row compiled GEMV
            assert torch.allclose(fast.logits(PROMPT[:1]), ref.logits(PROMPT[:1]), rtol=0, atol=1e-5)
            assert list(fast.generate_ids(PROMPT, 4, stop_ids=())) == list(ref.generate_ids(PROMPT, 4, stop_ids=()))
        assert fast.backend == "cpu" and not caplog.text
        layers.append(len(torch._dynamo.eval_frame._debug_get_cache_entry_list(cpu._layer.__code__)))
    assert all(b - a == 1 for a, b in zip(layers, layers[1:]))  # one graph of the layer for each model


def test_symbolic_position_on_a_torch_without_the_setting(monkeypatch):
    # torch.compiler.config.dynamic_sources is recent (pyproject allows torch 2.4): without it the compiled path
    # still runs, and compiles again at the second step, as before
    before = torch.compiler.config.dynamic_sources
    with cpu.symbolic_position():
        assert "L['pos']" in torch.compiler.config.dynamic_sources
    assert torch.compiler.config.dynamic_sources == before
    monkeypatch.delattr(torch.compiler, "config")
    with cpu.symbolic_position():
        pass


def test_embedding_and_head_stay_narrow_when_exact(compiled, files, monkeypatch):
    # the converted f32 floats came from bf16 masters: the compiled CPU path keeps the embedding and the (untied)
    # head in bf16, half the bytes, and still computes in fp32
    model = load(files["llama-bitnet"], device="cpu", compile_cpu=True)
    plain = load(files["llama-bitnet"], device="cpu", reference=True)
    net = model.net
    assert net.embed.dtype == net.head.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert plain.net.embed.dtype == plain.net.head.dtype == torch.float32
    assert torch.equal(net.embed.float(), plain.net.embed) and torch.equal(net.head.float(), plain.net.head)
    v, d = net.head.shape
    assert model.resident_weight_bytes() == plain.resident_weight_bytes() - 2 * v * d * 2
    want = plain.logits(PROMPT)
    assert torch.allclose(model.logits(PROMPT), want, rtol=0, atol=1e-5)
    # the plain network over the narrow head upcasts it a slice of rows at a time: 7 rows, so several slices and
    # a short last one (the tiny vocab is not a multiple of 7)
    monkeypatch.setattr(model_module, "HEAD_CHUNK", 7)
    assert v % 7
    net.setup_cache(1, len(PROMPT))
    got = net(torch.tensor([PROMPT]), 0)[0]
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=0, atol=1e-5)


def test_f16_file_on_the_compiled_path(compiled, tiny, tmp_path):
    # an f16 file's embedding stays f16 (the compiled head multiplies it in fp32) and gives the reference's tokens
    out = str(tmp_path / "f16.bin")
    convert_hf(str(tiny.microsoft_latent(tmp_path / "ms").path), out, dtype="f16", progress=False)
    fast = load(out, device="cpu", compile_cpu=True)
    ref = load(out, device="cpu", reference=True)
    assert fast.net.embed.dtype == torch.float16 and ref.net.embed.dtype == torch.float32
    assert list(fast.generate_ids(PROMPT, 8, stop_ids=())) == list(ref.generate_ids(PROMPT, 8, stop_ids=()))
    assert torch.allclose(fast.logits(PROMPT), ref.logits(PROMPT), rtol=0, atol=1e-5)


def test_narrow_dtype():
    exact = torch.randn(8200, 3).to(torch.bfloat16)
    assert narrow_dtype(exact) == torch.bfloat16
    assert narrow_dtype(exact.half()) == torch.float16
    assert narrow_dtype(exact.float()) == torch.bfloat16
    inexact = exact.float()
    inexact[-1, -1] += 1e-4  # one value in the last slice of rows
    assert narrow_dtype(inexact) == torch.float32


def test_prefill_and_repetition_penalty_paths(compiled, files):
    # prompts run the fused layers with the reference arithmetic and the compiled head; the repetition penalty
    # runs in the compiled step's decoder; a one-token forward of the plain network runs every BitLinear on the
    # "cpu" backend (one row: the compiled GEMV)
    fast = load(files["microsoft"], device="cpu", compile_cpu=True)
    ref = load(files["microsoft"], device="cpu", reference=True)
    kw = dict(stop_ids=(), repetition_penalty=1.3)
    stats = GenerationStats()
    assert list(fast.generate_ids(PROMPT, 12, stats=stats, **kw)) == list(ref.generate_ids(PROMPT, 12, **kw))
    assert stats.path == "cpu + device sampling"
    assert torch.allclose(fast.logits(PROMPT * 3), ref.logits(PROMPT * 3), rtol=0, atol=1e-5)
    long = PROMPT * (cpu.PREFILL_ROWS // len(PROMPT) + 1)  # a prompt through bitlinear_rows
    assert torch.allclose(fast.logits(long), ref.logits(long), rtol=0, atol=1e-5)
    assert torch.allclose(fast.logits(PROMPT[:1]), ref.logits(PROMPT[:1]), rtol=0, atol=1e-5)


def test_generation_reuses_the_cache(compiled, files):
    # a chat's next turn: the prompt extends the last generation, so only its new tokens run, even when the cache
    # has to grow for it; the ids equal the reference's from scratch
    fast = load(files["microsoft"], device="cpu", compile_cpu=True)
    ref = load(files["microsoft"], device="cpu", reference=True)
    kw = dict(stop_ids=(), reuse_cache=True)
    stats = GenerationStats()
    first = list(fast.generate_ids(PROMPT, 8, stats=stats, **kw))
    assert stats.cached_tokens == 0
    size = fast._decoder.max_seq
    longer = PROMPT + first + [4, 6]
    assert list(fast.generate_ids(longer, 8, stats=stats, **kw)) == list(ref.generate_ids(longer, 8, stop_ids=()))
    assert stats.cached_tokens == len(PROMPT) + 7 and fast._decoder.max_seq >= 2 * size
    # logits() writes into the cache: nothing of it is reused afterwards
    fast.logits(PROMPT)
    assert list(fast.generate_ids(longer, 8, stats=stats, **kw)) == list(ref.generate_ids(longer, 8, stop_ids=()))
    assert stats.cached_tokens == 0
    # without reuse_cache the whole prompt runs
    list(fast.generate_ids(longer, 8, stop_ids=(), stats=stats))
    assert stats.cached_tokens == 0
    # a generation left open while another runs: it cannot go on (it would attend to the other's keys), and
    # closing it, or its failed step, does not record its own context over the other's, which the next turn reuses
    other = [5, 9, *PROMPT]
    for end in ("next", "close"):
        left = fast.generate_ids(PROMPT, 8, **kw)
        next(left)
        reply = list(fast.generate_ids(other, 8, **kw))
        if end == "next":
            with pytest.raises(RuntimeError, match="this generation cannot go on: a later generate, chat, logits"):
                next(left)
        else:
            left.close()
        turn = other + reply + [4]
        assert list(fast.generate_ids(turn, 4, stats=stats, **kw)) == list(ref.generate_ids(turn, 4, stop_ids=()))
        assert stats.cached_tokens == len(other) + 7


# --- the int8 head ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2000, 30])  # 30: wq's rows padded to 32 columns
def test_int8_head_logits_exact(d):
    # the dot is an exact integer: row 0 quantizes to 127 everywhere, x's first row to values near 127, so their dot
    # (about 127·110·2000 = 2.8e7) is past fp32's exact integers
    g = torch.Generator().manual_seed(d)
    w = torch.randn(40, d, generator=g)
    w[0] = 1.0
    x = torch.randn(3, d, generator=g)
    x[0] = 1 + 0.3 * torch.rand(d, generator=g)
    wq, ws = quantize_head(w)
    assert wq.shape == (40, (d + 3) // 4 * 4) and bool((wq[:, d:] == 0).all())
    assert bool(((wq[:, :d].float() * ws[:, None] - w).abs() <= ws[:, None] / 2 + 1e-6).all())
    q, s = quantize_activations(x)
    dot = q.long() @ wq[:, :d].long().T  # [3, 40] int64
    assert d < 100 or int(dot[0, 0]) > 2**24
    assert torch.equal(int8_head_logits(x, wq, ws), dot.float() * ws / s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_head_blocks(dtype):
    # quantize_head goes through blocks of rows in a reused buffer: 1,100 rows make three, the last one short; a
    # zero row takes the clamped scale
    w = torch.randn(1100, 30, generator=torch.Generator().manual_seed(3)).to(dtype)
    w[700] = 0
    sc = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
    wq, ws = quantize_head(w)
    assert torch.equal(ws, sc)
    assert torch.equal(wq[:, :30], torch.round(w.float() / sc[:, None]).clamp(-127, 127).to(torch.int8))


def test_int8_head_on_the_compiled_path(compiled, files):
    # --head int8 on the CPU: it turns the compiled path on (a tiny model would run the reference path), decodes
    # with one int8 GEMV for the head, and gives the tokens and logits of the int8 head over the reference network
    f = files["microsoft"]
    with pytest.raises(DeviceError, match="head 'int8' needs a fast path .* but compiling is off"):
        load(f, device="cpu", head="int8", compile_cpu=False)
    with pytest.raises(DeviceError, match="but the reference path was asked for"):
        load(f, device="cpu", head="int8", reference=True)
    model = load(f, device="cpu", head="int8")
    plain = load(f, device="cpu", compile_cpu=True)
    assert model.backend == "cpu" and model.fast.head == "int8"
    v, d = model.net.head.shape
    assert model.resident_weight_bytes() == plain.resident_weight_bytes() + v * ((d + 3) // 4 * 4) + 4 * v
    ref = load(f, device="cpu", reference=True)
    ref_int8 = FastModel(ref.net, head="int8", backend="reference")  # the int8 head over the reference network
    stats = GenerationStats()
    got = list(model.generate_ids(PROMPT, 12, stop_ids=(), stats=stats))
    assert stats.path == "cpu + device sampling"
    seq = PROMPT + got
    for m in (model, ref, plain):
        m.net.setup_cache(1, len(seq))
    with torch.inference_mode():
        prompt = torch.tensor([PROMPT])
        steps = [(model.fast.logits(prompt, 0)[0, -1], ref_int8.logits(prompt, 0)[0, -1])]
        for pos in range(len(PROMPT), len(seq) - 1):
            tok = torch.tensor([[seq[pos]]])
            steps.append((model.fast.logits(tok, pos)[0, -1], ref_int8.logits(tok, pos)[0, -1]))
        bf16 = plain.fast.logits(torch.tensor([PROMPT]), 0)[0, -1]
    for i, (a, b) in enumerate(steps):
        assert int(a.argmax()) == int(b.argmax()) == seq[len(PROMPT) + i]
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()
    assert not torch.equal(steps[0][0], bf16)  # the int8 head ran, not the bf16 one
    assert (steps[0][0] - bf16).abs().max() <= 0.05 * bf16.abs().max()


# --- dispatch and fallback --------------------------------------------------------------------------------------
def test_dispatch(compiled, files, monkeypatch, caplog):
    from bitnet158.runtime import loader

    f = files["microsoft"]
    assert load(f, device="cpu").backend == "reference"  # a tiny model: compiling would cost more than it saves
    assert load(f, device="cpu", compile_cpu=True).backend == "cpu"
    assert load(f, device="cpu", compile_cpu=True, reference=True).backend == "reference"
    monkeypatch.setattr(loader, "CPU_COMPILE_MIN_WEIGHTS", 1000)
    assert load(f, device="cpu").backend == "cpu"  # a model above the threshold compiles by default
    assert load(f, device="cpu", compile_cpu=False).backend == "reference"
    with pytest.raises(ValueError, match="head 'int8' needs a fast path"):
        load(f, device="cpu", head="int8", compile_cpu=False)


def test_compile_failure_falls_back_to_reference(files, monkeypatch, caplog):
    # runs where torch.compile cannot build kernels too: that is the machine this fallback is for
    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(cpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cpu, "kernels", lambda: SimpleNamespace(layer=broken, head=broken))
    fast = load(files["1bitllm"], device="cpu", compile_cpu=True)
    ref = load(files["1bitllm"], device="cpu", reference=True)
    with caplog.at_level(logging.WARNING):
        got = list(fast.generate_ids(PROMPT, 8, stop_ids=()))
    assert "the compiled CPU path failed (RuntimeError: InvalidCxxCompiler" in caplog.text
    assert fast.backend == "reference"
    assert got == list(ref.generate_ids(PROMPT, 8, stop_ids=()))


def test_failure_after_compiling_propagates(compiled, files, monkeypatch, caplog):
    # the fallback above is for a path that never ran: once the compiled code has run, a later failure (out of
    # memory, a bug) is raised, not hidden behind a silent switch to the reference path
    def broken(*args):
        raise RuntimeError("out of memory")

    fast = load(files["1bitllm"], device="cpu", compile_cpu=True)
    list(fast.generate_ids(PROMPT, 3, stop_ids=()))
    with pytest.raises(FastPathError, match=r"positions up to \d+ exceed the cache"):
        fast.fast.logits_last(torch.zeros(1, 2, dtype=torch.long), fast.net.max_seq - 1)
    monkeypatch.setattr(cpu, "kernels", lambda: SimpleNamespace(layer=broken, head=broken, bitlinear=broken))
    with pytest.raises(RuntimeError, match="out of memory"):
        list(fast.generate_ids(PROMPT, 3, stop_ids=()))
    assert fast.backend != "reference"
    x, packed, scale = torch.randn(1, 64), pack_t2(torch.ones(8, 64, dtype=torch.int8)), torch.ones(1)
    ran = {"ok": {cpu._gemv_key(x, packed, scale)}, "failed": set()}
    monkeypatch.setattr(cpu, "_vec_state", ran)  # the compiled GEMV has run at these shapes
    with pytest.raises(RuntimeError, match="out of memory"):
        cpu.bitlinear_cpu(x, packed, scale, 64)
    # at shapes it has not run (another model's): a failure to compile them, so the reference arithmetic, said once
    other = BitLinear(pack_t2(torch.randint(-1, 2, (8, 36), dtype=torch.int8)), scale, 36)
    x = torch.randn(1, 36)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert torch.equal(cpu.bitlinear_cpu(x, other.packed, other.scale, 36), other(x))
    assert caplog.text.count("the compiled CPU GEMV failed (RuntimeError: out of memory)") == 1
    assert cpu._gemv_key(x, other.packed, other.scale) in ran["failed"]


@pytest.mark.parametrize("flag, path", [("--compile", "cpu + device sampling"), ("--reference", "reference")])
def test_cli_flags(compiled, files, flag, path):
    run = CliRunner().invoke(cli_main, [files["microsoft"], "--prompt", "ab", "-n", "4", flag])
    assert run.exit_code == 0, run.output
    assert f"path:             {path}" in run.output
    assert ("warm-up:" in run.output) == (flag == "--compile")
