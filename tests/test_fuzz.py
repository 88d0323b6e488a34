"""Seeded mutation fuzzing of every reader: a packed file's header (its CRC fixed up, so that the JSON checks run),
a GGUF file's metadata and tensor-info bytes, and an HF folder's config.json and tokenizer files. Every mutated
input must load, or fail with one of this project's errors (ValueError subclasses): never another exception, a
Rust panic from tokenizers, or a hang. The first runs of these found (all fixed): a GGUF merge naming a token
outside the vocabulary (tokenizers' bare Exception), a config.json whose architectures is not a list (TypeError),
num_hidden_layers = 2^63 (the converter's plan never finished), and a tokenizer.json that loads but panics when
used (pyo3's PanicException)."""

from __future__ import annotations

import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from bitnet158.converter.gguf_convert import packed_to_gguf
from bitnet158.converter.hf import convert_hf
from bitnet158.converter.random_model import model_config, write_random_model
from bitnet158.formats.gguf import GGUFFile
from bitnet158.runtime import load

# values a mutation puts in place of a JSON value: wrong types, edges of ints and floats, names of other options
ODD = [0, -1, 1, 3, 64, 2**31, 2**32, 2**63, 10**30, 0.5, 1e308, -0.0, float("nan"), "", "x", None, True, False, [],
       {}, [1], "t2", "bf16", "f32", "row", "tensor", "relu2", "silu", "bitnet", "F32", "U8"]  # fmt: skip


def _paths(obj, skip: tuple[str, ...], at: tuple = ()):
    # the path of every JSON value below obj, not descending into the keys in skip (the large blobs)
    if at:
        yield at
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if k in skip:
            yield at + (k,)
        else:
            yield from _paths(v, skip, at + (k,))


def _mutate(obj, rng: random.Random, skip: tuple[str, ...] = ()) -> str:
    # one random edit of obj in place: a value deleted, an int nudged, a list entry dropped / repeated / the list
    # shuffled, or a value replaced by an ODD one. Returns what it did.
    path = rng.choice(list(_paths(obj, skip)))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key, cur = path[-1], parent[path[-1]]
    r = rng.random()
    if r < 0.1 and isinstance(parent, dict):
        del parent[key]
        return f"del {path}"
    if r < 0.4 and isinstance(cur, int) and not isinstance(cur, bool):
        parent[key] = cur + rng.choice([-1, 1, 64, cur, -cur, 1 << 20])
    elif r < 0.5 and isinstance(cur, list) and cur:
        i = rng.randrange(len(cur))
        rng.choice([lambda: cur.pop(i), lambda: cur.append(cur[i]), lambda: rng.shuffle(cur)])()
    else:
        parent[key] = rng.choice(ODD)
    return f"{path} = {str(parent.get(key) if isinstance(parent, dict) else parent[key])[:40]}"


def _outcome(case: str, run) -> bool:
    """True when ``run()`` loaded the input, False when it refused it with a ValueError; anything else fails."""
    try:
        run()
    except ValueError:
        return False
    except BaseException as e:  # a Rust panic is a BaseException
        raise AssertionError(f"{case}: {type(e).__name__}: {e}") from e
    return True


def _use(path: Path) -> None:
    # open the model and run it a little: the tokenizer, the network, the generation loop
    model = load(str(path), device="cpu", reference=True)
    "".join(model.generate("the theme", 2))


@pytest.fixture(scope="module")
def silu_model(tmp_path_factory) -> Path:
    # 1bitLLM-large's widths at 1 layer and 300 ids (SiLU: what TQ2_0 exports), the byte tokenizer with merges
    path = tmp_path_factory.mktemp("fuzz") / "silu.bin"
    write_random_model(path, model_config("1bitllm-large", 1, 300), progress=False)
    return path


def test_packed_header_mutations(silu_model, tmp_path):
    raw = silu_model.read_bytes()
    (n,) = struct.unpack_from("<Q", raw, 16)
    header = json.loads(raw[32 : 32 + n])
    first = min(t["offset"] for t in header["tensors"])
    room = 4096  # the data moves this far back, so that a mutated header that grew still fits before it
    for t in header["tensors"]:
        t["offset"] += room
    data = raw[first:]
    rng = random.Random(0)
    seen = set()
    for i in range(250):
        h = json.loads(json.dumps(header))
        what = [_mutate(h, rng, skip=("tokenizer_json", "chat_template")) for _ in range(rng.choice([1, 1, 2]))]
        hb = json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode()
        if 32 + len(hb) > first + room:
            continue
        path = tmp_path / "m.bin"
        preamble = raw[:16] + struct.pack("<QI", len(hb), zlib.crc32(hb)) + raw[28:32]
        path.write_bytes(preamble + hb + bytes(first + room - 32 - len(hb)) + data)
        seen.add(_outcome(f"packed case {i}: {what}", lambda: _use(path)))
    assert seen == {True, False}  # some mutations keep a loadable file (the CRCs of the data are checked by verify)


def test_gguf_metadata_and_tensor_info_mutations(silu_model, tmp_path):
    src = tmp_path / "m.gguf"
    packed_to_gguf(silu_model, src, qtype="tq2_0")
    raw = src.read_bytes()
    with GGUFFile(src) as f:
        end = f.data_offset  # metadata, tensor infos and padding: the bytes a reader parses
    rng = random.Random(1)
    seen = set()
    for i in range(300):
        b = bytearray(raw)
        spots = [rng.randrange(end) for _ in range(rng.choice([1, 1, 2, 4]))]
        for at in spots:
            b[at] = rng.choice([0, 255, rng.randrange(256), b[at] ^ (1 << rng.randrange(8))])
        path = tmp_path / "x.gguf"
        path.write_bytes(b[: rng.randrange(end, len(b))] if rng.random() < 0.05 else b)
        seen.add(_outcome(f"gguf case {i}: bytes at {spots}", lambda: _use(path)))
    assert seen == {True, False}


def test_hf_config_and_tokenizer_mutations(ms_packed_auto, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ms_packed_auto.path, src)
    files = {name: json.loads((src / name).read_text()) for name in ("config.json", "tokenizer.json")}
    rng = random.Random(2)
    seen = set()
    for i in range(200):
        name = "config.json" if i % 2 else "tokenizer.json"
        obj = json.loads(json.dumps(files[name]))
        what = [_mutate(obj, rng, skip=("vocab", "merges")) for _ in range(rng.choice([1, 1, 2]))]
        (src / name).write_text(json.dumps(obj))
        out = tmp_path / "out.bin"
        seen.add(_outcome(f"hf case {i}: {name} {what}",
                          lambda: convert_hf(str(src), str(out), force=True, progress=False)))  # fmt: skip
        (src / name).write_text(json.dumps(files[name]))
    assert seen == {True, False}
