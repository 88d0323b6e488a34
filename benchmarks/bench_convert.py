"""Time `convert_hf` on a random checkpoint of the BitNet b1.58 2B-4T shape, against reading its files once.

    python benchmarks/bench_convert.py --dir /tmp/bench2b4t            # packed form, like microsoft/bitnet-b1.58-2B-4T
    python benchmarks/bench_convert.py --dir /tmp/bench2b4t --latent   # latent bf16 masters, like ...-2B-4T-bf16

The checkpoint (hidden 2560, intermediate 6912, 30 layers, 20/5 heads, vocab 128256, tied head) is written with
a streaming safetensors writer, so this script never holds it in memory. The tokenizer is a tiny BPE one: it does
not affect the timing. Each measurement runs in a fresh child process with the source evicted from the page cache
first (posix_fadvise DONTNEED, "cold-ish": a disk cache below the OS may still hold it):

- read: read every byte of the source files once (16 MiB chunks);
- copy: read them and write the bytes to one file beside the output, fsynced (the I/O floor of any converter
  that writes a file of the source's size: on a VM whose writes are slower than its reads this dominates);
- convert: ``convert_hf`` (which hashes every source file for the provenance, then converts tensor by tensor).

Peak memory of the conversion child: VmHWM (peak RSS, which counts touched pages of the mmapped source), and the
peak anonymous RSS (RssAnon, sampled every 20 ms): the memory the conversion allocates beyond the mapped source.
Targets (issue 2): peak anonymous RSS <= 2 GB; conversion <= 2x the read time. Files are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = {"hidden": 2560, "inter": 6912, "layers": 30, "heads": 20, "kv_heads": 5, "vocab": 128256}

_CHILD = r"""
import json, os, sys, threading, time
mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
def status():
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon", "RssFile"):
                d[k] = int(v.split()[0]) * 1024
    return d
peak = {"anon": 0}
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak["anon"] = max(peak["anon"], status()["RssAnon"]); time.sleep(0.02)
for p in sorted(os.listdir(folder)):  # evict the source from the page cache
    fd = os.open(os.path.join(folder, p), os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
if mode != "read":
    from bitnet158.converter.hf import convert_hf  # import time is not conversion time
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
if mode in ("read", "copy"):
    n = 0
    for p in sorted(os.listdir(folder)):
        with open(os.path.join(folder, p), "rb", buffering=0) as f:
            dst = open(out, "wb", buffering=0) if mode == "copy" else None
            while chunk := f.read(16 << 20):
                n += len(chunk)
                if dst:
                    dst.write(chunk)
            if dst:
                os.fsync(dst.fileno())
                dst.close()
                os.unlink(out)
else:
    s = convert_hf(folder, out, force=True, progress=False)
    n = s.file_size
secs = time.perf_counter() - t0
stop.set(); time.sleep(0.05)
st = status()
print(json.dumps({"seconds": secs, "bytes": n, "vmhwm": st["VmHWM"], "peak_anon": max(peak["anon"], st["RssAnon"])}))
"""


class _SafetensorsStream:
    """Writes a safetensors file tensor by tensor (header first, computed from the declared shapes)."""

    DT = {"U8": 1, "BF16": 2, "F32": 4}

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]]):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, shape in specs:
            n = int(np.prod(shape)) * self.DT[dt]
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.order = [s[0] for s in specs]

    def write(self, name: str, data: np.ndarray) -> None:
        assert name == self.order.pop(0), name
        self.f.write(np.ascontiguousarray(data).tobytes())

    def close(self) -> None:
        assert not self.order
        self.f.close()


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), truncating."""
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_checkpoint(folder: Path, latent: bool, layers: int) -> None:
    """Random 2B-4T-shaped checkpoint: config, a tiny tokenizer, one model.safetensors."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import (
        bpe_tokenizer,  # the shared tiny tokenizer; its size does not matter here
    )

    s = SHAPE
    folder.mkdir(parents=True, exist_ok=True)
    bpe_tokenizer(folder)
    hd = s["hidden"] // s["heads"]
    cfg = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
        "hidden_size": s["hidden"], "intermediate_size": s["inter"], "num_hidden_layers": layers,
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    }
    if not latent:
        cfg["quantization_config"] = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    lin = {"self_attn.q_proj": (s["heads"] * hd, s["hidden"]), "self_attn.k_proj": (s["kv_heads"] * hd, s["hidden"]),
           "self_attn.v_proj": (s["kv_heads"] * hd, s["hidden"]), "self_attn.o_proj": (s["hidden"], s["heads"] * hd),
           "mlp.gate_proj": (s["inter"], s["hidden"]), "mlp.up_proj": (s["inter"], s["hidden"]),
           "mlp.down_proj": (s["hidden"], s["inter"])}
    norms = {"input_layernorm": s["hidden"], "post_attention_layernorm": s["hidden"],
             "self_attn.attn_sub_norm": s["heads"] * hd, "mlp.ffn_sub_norm": s["inter"]}
    specs = [("model.embed_tokens.weight", "BF16", (s["vocab"], s["hidden"]))]
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, (o, k) in lin.items():
            specs.append((p + n + ".weight", "BF16" if latent else "U8", (o, k) if latent else (o // 4, k)))
            if not latent:
                specs.append((p + n + ".weight_scale", "BF16", (1,)))
        specs += [(p + n + ".weight", "BF16", (d,)) for n, d in norms.items()]
    specs.append(("model.norm.weight", "BF16", (s["hidden"],)))
    rng = np.random.default_rng(0)
    w = _SafetensorsStream(folder / "model.safetensors", specs)
    for name, dt, shape in specs:
        if dt == "U8":  # four 2-bit codes in {0, 1, 2} per byte (code 3 is unused)
            codes = rng.integers(0, 3, size=(4, *shape), dtype=np.uint8)
            data = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
        elif name.endswith("weight_scale"):
            data = _bf16(np.array([rng.uniform(0.5, 3.0)]))
        elif len(shape) == 1:
            data = _bf16(1 + 0.1 * rng.standard_normal(shape, dtype=np.float32))
        else:
            data = _bf16(0.02 * rng.standard_normal(shape, dtype=np.float32))
        w.write(name, data)
    w.close()


def run_child(mode: str, folder: Path, out: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, str(folder), str(out)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{mode} child failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, type=Path, help="scratch folder (several GB)")
    ap.add_argument("--latent", action="store_true", help="latent bf16 masters instead of the packed form")
    ap.add_argument("--layers", type=int, default=SHAPE["layers"], help="fewer layers for a quick check")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and output (a rerun reuses it)")
    args = ap.parse_args()
    src, out = args.dir / "src", args.dir / "out.bnp"
    try:
        t0 = time.perf_counter()
        if (src / "model.safetensors").is_file():  # left by an earlier --keep run
            print(f"reusing {src}")
        else:
            make_checkpoint(src, args.latent, args.layers)
        src_bytes = sum(p.stat().st_size for p in src.iterdir())
        print(f"{'latent bf16' if args.latent else 'packed'} 2B-4T-shaped checkpoint ({args.layers} layers, "
              f"{src_bytes / 1e9:.2f} GB), ready in {time.perf_counter() - t0:.1f} s")
        read = run_child("read", src, out)
        copy = run_child("copy", src, out)
        conv = run_child("convert", src, out)
        gb = 1e9
        rows = [
            ("source size", f"{src_bytes / gb:.2f} GB"),
            ("output size", f"{conv['bytes'] / gb:.2f} GB"),
            ("read source once (cold-ish)", f"{read['seconds']:.2f} s ({src_bytes / gb / read['seconds']:.2f} GB/s)"),
            ("copy source once (read + write + fsync)", f"{copy['seconds']:.2f} s"),
            ("convert (cold-ish)", f"{conv['seconds']:.2f} s"),
            ("convert / read", f"{conv['seconds'] / read['seconds']:.2f}x   (target <= 2x)"),
            ("convert / copy", f"{conv['seconds'] / copy['seconds']:.2f}x"),
            ("convert peak RSS (VmHWM, incl. mapped source)", f"{conv['vmhwm'] / gb:.2f} GB"),
            ("convert peak anonymous RSS (beyond the mapping)", f"{conv['peak_anon'] / gb:.2f} GB   (target <= 2 GB)"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"{'cpu':<{width}}  {os.cpu_count()} cores")
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
