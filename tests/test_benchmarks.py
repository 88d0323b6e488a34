"""The benchmarks, checked where there is no GPU. The GPU benchmark's variant list: a device session has minutes,
so a variant that names an option FastModel lacks, or a parser slip, must fail here rather than there (the
benchmark itself runs on the CPU as ``python benchmarks/bench_gpu.py --smoke``: minutes in Triton's interpreter,
not a test). The int8 head's quality script, which runs anywhere, on the demo model."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # without CUDA the kernels run in the interpreter (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_gpu imports its neighbour launch_floor by name
    try:
        spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_graph_variants_name_fastmodel_options(bench):
    from bitnet158.runtime import fast

    allowed = {"attention": fast.ATTENTIONS, "gemv": fast.GEMVS, "pdl": fast.PDLS, "head": fast.HEADS, "argmax": fast.ARGMAXES,
               "tiles": fast.TILES, "prefetch": fast.PREFETCHES}  # fmt: skip
    variants = [*bench.GRAPH_VARIANTS, bench.default_variant()]
    for v in variants:
        for field, value in v._asdict().items():
            assert value in allowed[field], (v, field)
    assert len(set(bench.GRAPH_VARIANTS)) == len(bench.GRAPH_VARIANTS)
    assert {v.gemv for v in bench.GRAPH_VARIANTS} == set(fast.GEMVS)  # every GEMV variant is measured
    assert {v.argmax for v in bench.GRAPH_VARIANTS} == set(fast.ARGMAXES)
    assert {v.prefetch for v in bench.GRAPH_VARIANTS} == set(fast.PREFETCHES)
    assert {v.pdl for v in bench.GRAPH_VARIANTS} == set(fast.PDLS)
    assert bench.variant_name(bench.default_variant()).endswith("(default)")
    assert len({bench.variant_name(v) for v in bench.GRAPH_VARIANTS}) == len(bench.GRAPH_VARIANTS)  # result keys


def test_variant_specs_parse(bench):
    v = bench.parse_variant("split/folded/pdl/int8/argmax")
    assert v == bench.Variant("split", "folded", True, "int8", "triton")
    assert bench.parse_variant("torch/plain") == bench.Variant("torch", "plain", False, "bf16", "torch")
    assert bench.parse_variant("default") == bench.default_variant()
    assert bench.parse_variant("default/int8") == bench.default_variant()._replace(head="int8")
    assert bench.parse_variant("split/packed/pdl/argmax/autotune") == bench.Variant("split", "packed", True, "bf16", "triton", "autotune")
    assert bench.parse_variant("default/prefetch") == bench.default_variant()._replace(prefetch="after")
    assert bench.parse_variant("split/packed/pdl/prefetch-early").prefetch == "before"
    assert bench.parse_variant("split/packed/pdl-early/argmax") == bench.Variant("split", "packed", "early", "bf16", "triton")
    assert bench.parse_variant("default/pdl-early") == bench.default_variant()._replace(pdl="early")
    assert bench.variant_name(bench.parse_variant("default/pdl-early")).endswith("PDL (early trigger) + argmax kernel + searched tiles")
    assert bench.parse_variant("default/pdl-early-packs") == bench.default_variant()._replace(pdl="early-packs")
    assert bench.parse_variant("split/packed/pdl-early-packs").pdl == "early-packs"
    assert "PDL (early trigger in the packs) + " in bench.variant_name(bench.parse_variant("default/pdl-early-packs"))
    assert bench.parse_variant("default/pdl").pdl is True and bench.parse_variant("split/packed").pdl is False
    assert bench.default_variant().tiles == "searched" and bench.default_variant().argmax == "triton"
    for bad in ("split", "split/packed/fast", "split/packed/pdl/bf16", "default/fast", "default/prefetch/prefetch-early",
                "split/packed/pdl/pdl-early", "default/pdl-early/pdl-early-packs", "split/packed/pdl-late"):
        with pytest.raises(SystemExit):
            bench.parse_variant(bad)
    # the device script's quick run asks for these: each must parse
    script = (ROOT / "benchmarks" / "device_check.sh").read_text()
    specs = [s for line in script.splitlines() if "--variants" in line for s in line.split("--variants")[1].split()[0].split(",")]
    assert len(specs) >= 4
    for spec in specs:
        bench.parse_variant(spec)
    # ... and its quick run's GPU tests (pytest -k): each name must still select a GPU test, or it checks nothing
    quick = re.search(r'quick="([^"]*)"', script).group(1) + re.search(r'-k "\$quick( or [^"]*)"', script).group(1)
    gpu_tests = re.findall(r"^@gpu\n(?:@.*\n)*def (test_\w+)", (ROOT / "tests" / "test_kernels.py").read_text(), re.M)
    names = quick.split(" or ")
    assert len(names) >= 6 and all(any(n in t for t in gpu_tests) for n in names), (names, gpu_tests)


def test_attention_scaling_runs_both_ways(bench):
    # the device check's attention probe, on the CPU (kernels in the interpreter, an eager timer): at 300 slots a
    # split spans two key blocks, so the pipelined loop runs, and it must give the unpipelined output bit for bit
    from types import SimpleNamespace

    attn = SimpleNamespace(n_heads=4, n_kv=2, head_dim=16)
    net = SimpleNamespace(layers=[SimpleNamespace(attn=attn)] * 2, head=torch.zeros(1, device="cuda" if HAS_CUDA else "cpu"))
    calls = []

    def timer(fns):
        calls.append(len(fns))
        for f in fns:
            f()
        return 1e-6

    bench.RESULTS["bandwidth"] = 1e10
    bench.RESULTS.pop("attention_scaling", None)
    bench.attention_scaling(net, slot_counts=(40, 300), timer=timer)
    rows = bench.RESULTS["attention_scaling"]
    assert [r["slots"] for r in rows] == [40, 300] and calls == [2] * 4
    assert all(r["pipelined_equal"] for r in rows)
    assert rows[1]["kv_bytes"] == 2 * 2 * 299 * 16 * 4


def test_head_quality_on_the_demo_model(tmp_path):
    # benchmarks/head_quality.py on the trained demo model: its bf16 perplexity is bitnet-run's, and the int8 head
    # costs that model under 1 % of perplexity with nearly the same top-1 (a head quantized with the wrong row's
    # scale, or none, is far off both)
    import json
    import subprocess

    out = tmp_path / "head.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "head_quality.py"), "--device", "cpu", "--ctx", "64",
           "--prompts", "2", "--new-tokens", "8", "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["ctx"] == 64 and res["stride"] == 32 and res["tokens_scored"] > 1000
    assert res["ppl_bf16"] == pytest.approx(res["ppl_bitnet_run"], rel=1e-6)
    assert abs(res["ppl_int8"] / res["ppl_bf16"] - 1) < 0.01
    assert res["top1_agreement"] > 0.97 and 0 < res["kl_mean"] < 1e-2 and 0 < res["logits_rel_err"] < 0.05
    assert 0 <= res["tokens_before_first_difference"] <= 8 and res["identical"] <= 2


def test_a_failed_variant_names_where_it_failed(bench):
    # a device call leaves only its log: a failed variant's line names the error and the line that raised it
    try:
        {}["o"]
    except KeyError as e:
        msg = bench.failure(e)
    assert msg.startswith("KeyError: 'o' (at test_benchmarks.py:") and msg.endswith("in test_a_failed_variant_names_where_it_failed)")


def probe_net(folder: Path):
    """The step-gap probes' model: a random 3-layer network of the 2B-4T family, small, loaded on the CPU."""
    from bitnet158.converter.random_model import model_config, write_random_model
    from bitnet158.runtime.loader import load

    small = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    write_random_model(folder / "m.bin", {**model_config("2b4t", 3, 300), **small}, progress=False)
    return load(folder / "m.bin", device="cpu").net


def test_shared_weights_probe_points_every_layer_at_layer_0(bench, tmp_path):
    # the step-gap probe's L2 case: inside shared_weights every layer's four GEMVs read layer 0's packed bytes (the
    # step computes something else), and after it each has its own again, bit for bit the same logits
    from bitnet158.runtime.fast import FastModel

    net = probe_net(tmp_path)
    fast = FastModel(net, backend="reference")
    groups = list(zip(*(fast.site_linears(i) for i in range(3))))  # per site, the three layers' matrices
    own = [[lin.packed.data_ptr() for lin in g] for g in groups]
    assert all(len(set(g)) == 3 for g in own)
    tok = torch.tensor([[5, 9, 200]])
    with torch.inference_mode():
        net.setup_cache(1, 8)
        want = fast.logits_last(tok, 0)
        with bench.shared_weights(fast):
            assert all({lin.packed.data_ptr() for lin in g} == {g[0].packed.data_ptr()} for g in groups)
            assert not torch.equal(fast.logits_last(tok, 0), want)
        assert [[lin.packed.data_ptr() for lin in g] for g in groups] == own
        assert torch.equal(fast.logits_last(tok, 0), want)


@pytest.mark.parametrize("what, real_calls", [("packs", 4), ("attention", 1), ("gemvs", 4)])
def test_skipping_probe_launches_each_kind_once_a_shape(bench, tmp_path, monkeypatch, what, real_calls):
    # the step-gap probe's ablations: inside skipping(fast, what) only the first call of each shape of that kind
    # runs (one per site for the packs and GEMVs, one attention), every later one returns its result, so the
    # logits change; after it the step runs every kernel again and gives the same logits bit for bit
    from bitnet158.runtime import kernels
    from bitnet158.runtime.fast import FastModel

    fast = FastModel(probe_net(tmp_path), backend="triton", gemv="packed")
    calls = []  # the real kernels (or _attend) underneath the probe
    counted = {"packs": (kernels, "pack_act"), "attention": (FastModel, "_attend"),
               "gemvs": (kernels, "bitlinear_gemv_packed")}[what]  # fmt: skip
    real = getattr(*counted)
    monkeypatch.setattr(*counted, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    tok, pos = torch.tensor([[9]]), torch.tensor([3])
    with torch.inference_mode():
        fast.net.setup_cache(1, 8)
        fast.logits_last(torch.tensor([[5, 9, 200]]), 0)
        calls.clear()
        want = fast.logits_last(tok, pos)
        per_step = len(calls)  # one a layer and site (3 layers)
        assert per_step == 3 * real_calls
        calls.clear()
        with bench.skipping(fast, what) as skipped:
            got = [fast.logits_last(tok, pos) for _ in range(2)]
        assert len(calls) == real_calls and skipped[0] == 2 * per_step - real_calls
        assert not torch.equal(got[1], want) and torch.equal(got[0], got[1])
        assert "_pack" not in vars(fast) and "_attend" not in vars(fast)
        assert torch.equal(fast.logits_last(tok, pos), want)
    with pytest.raises(ValueError, match="none of"):
        with bench.skipping(fast, "head"):
            pass


def test_device_checks_cli_calls_parse(tmp_path, monkeypatch):
    """The device script's bitnet-compare call (the demo model against transformers on CUDA), run here with the
    CPU for CUDA: an option it names that the CLI lacks must fail here, not in a device session's minutes."""
    import ast

    from bitnet158.compare.cli import main
    from bitnet158.converter.hf import convert_hf

    script = (ROOT / "benchmarks" / "device_check.sh").read_text().replace("\\\n", "")
    line = next(ln for ln in script.splitlines() if "bitnet158.compare.cli" in ln)
    argv = ast.literal_eval(re.search(r"sys\.argv\[1:\] = (\[.*?\])", line).group(1))
    assert argv[argv.index("--device") + 1] == "cuda" and argv[0] == "/tmp/tiny.bin"
    convert_hf(str(ROOT / "examples" / "tiny-bitnet"), str(tmp_path / "tiny.bin"), progress=False)
    argv = [str(tmp_path / "tiny.bin"), *argv[1:]]
    argv[argv.index("--device") + 1] = "cpu"
    monkeypatch.chdir(ROOT)  # the script runs from the repository root
    monkeypatch.setattr(sys, "argv", ["bitnet-compare", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0


def test_bench_gpu_runs_on_a_file(bench, tmp_path, monkeypatch):
    """bench_gpu.py --file, as the device script runs it on the demo model, from its arguments to its table: the
    stages that take minutes in the interpreter (the correctness check, the int8 head's effect, the variants)
    stubbed, so that a slip in the code between them (a renamed attribute once stopped the whole run) fails here.
    The full-size run's prompt and tokens (512 + 256) are fitted to the demo model's context of 256."""
    from bitnet158.converter.hf import convert_hf

    convert_hf(str(ROOT / "examples" / "tiny-bitnet"), str(tmp_path / "tiny.bin"), progress=False)
    text, sizes = [], []
    monkeypatch.setattr(bench, "check_correctness", lambda *a, **k: bench.RESULTS.update(correct=True))
    monkeypatch.setattr(bench, "int8_head_effect", lambda fast, prompt, text_ids: text.append(text_ids))
    monkeypatch.setattr(bench, "run_variants", lambda fast, prompt, args, t0: sizes.append((len(prompt), args.tokens)))
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--smoke", "--file", str(tmp_path / "tiny.bin"), "--no-micro",
                                      "--prompt-len", "512", "--tokens", "256", "--runs", "1", "--variants", "default",
                                      "--json", str(tmp_path / "bench.json")])  # fmt: skip
    assert bench.main() == 0
    assert len(text) == 1 and len(text[0]) > 100  # the demo's tokenizer takes the built-in text
    assert sizes == [(128, 128)]
    assert (tmp_path / "bench.json").is_file()
