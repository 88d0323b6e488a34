"""The converter's tokenizer against transformers' AutoTokenizer, the oracle: token ids, special tokens and chat
templates, on tokenizer folders built from the demo model's tokenizer.json and the metadata real repositories
carry (tokenizer_config.json forms of transformers v4 and v5, special_tokens_map.json, template files)."""

import json
import shutil
from pathlib import Path

import pytest

from bitnet158.converter.tokenizer import normalize_tokenizer
from bitnet158.runtime.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

DEMO = Path(__file__).parents[1] / "examples" / "tiny-bitnet"
BASE = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
IM_START = {"content": "<|im_start|>", "special": True, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False}  # fmt: skip
TEXTS = ["Hi<|im_start|>there", "<|begin_of_text|>x<|eot_id|>", "  In the beginning ", "naïve 🙂"]


def folder(tmp_path: Path, name: str, tcfg: dict | None = None, files: dict | None = None) -> Path:
    """A tokenizer folder: the demo model's tokenizer.json, ``tcfg`` as tokenizer_config.json, and ``files``
    (name -> text or JSON object)."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(DEMO / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text(json.dumps(BASE if tcfg is None else tcfg))
    for fname, content in (files or {}).items():
        (d / fname).parent.mkdir(exist_ok=True)
        (d / fname).write_text(content if isinstance(content, str) else json.dumps(content))
    return d


def ours_and_theirs(d: Path):
    tok, _, facts = normalize_tokenizer(d)
    return tok, facts, transformers.AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("case", ["added_tokens_decoder", "extra_special_tokens_dict", "special_tokens_map",
                                  "mask_token", "legacy_map_overrides"])  # fmt: skip
def test_special_tokens_as_transformers(tmp_path, case):
    # every place transformers takes special tokens from: a token declared only there is one id, not its pieces
    tcfg, files = dict(BASE), {}
    if case == "added_tokens_decoder":
        tcfg["added_tokens_decoder"] = {"2048": IM_START}
    elif case == "extra_special_tokens_dict":  # v5's form
        tcfg["extra_special_tokens"] = {"image_token": "<|im_start|>"}
    elif case == "special_tokens_map":
        files["special_tokens_map.json"] = {"additional_special_tokens": ["<|im_start|>"]}
    elif case == "mask_token":
        tcfg["mask_token"] = "<|im_start|>"
    else:  # a v4 folder without added_tokens_decoder: special_tokens_map.json's EOS wins
        files["special_tokens_map.json"] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    tok, facts, hf = ours_and_theirs(folder(tmp_path, case, tcfg, files))
    ours = Tokenizer(tok)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text
    assert (tok["bos_token"], tok["eos_token"]) == (hf.bos_token, hf.eos_token)
    assert (facts["bos_token_id"], facts["eos_token_id"]) == (hf.bos_token_id, hf.eos_token_id)
    assert tok["special_tokens"] == hf.special_tokens_map
    if case != "legacy_map_overrides":
        assert hf.convert_tokens_to_ids("<|im_start|>") in ours.encode("Hi<|im_start|>there")
    else:
        assert tok["eos_token"] == "<|eot_id|>"


@pytest.mark.parametrize("legacy, prefix, class_in", [(False, True, "tokenizer_config"), (False, False, "config"),
                                                     (True, True, "tokenizer_config")])  # fmt: skip
def test_llama_tokenizer_class_rebuilds_its_pre_tokenizer(tmp_path, legacy, prefix, class_in):
    # transformers v5's LlamaTokenizer rebuilds the Metaspace pre-tokenizer and decoder from legacy and
    # add_prefix_space, whatever tokenizer.json says: a SentencePiece-style vocabulary tokenizes as it does. The
    # class may be named by config.json where tokenizer_config.json names none
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    sp = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    sp.train_from_iterator(["Hello world, in the beginning was the word"] * 20, trainer)
    tcfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "legacy": legacy, "add_prefix_space": prefix}  # fmt: skip
    d = tmp_path / "llama"
    d.mkdir()
    sp.save(str(d / "tokenizer.json"))
    if class_in == "config":
        cfg = {"model_type": "bitnet", "tokenizer_class": tcfg.pop("tokenizer_class")}
        (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer_config.json").write_text(json.dumps(tcfg))
    tok, _, hf = ours_and_theirs(d)
    ours = Tokenizer(tok)
    for text in ["Hello world", "<s>[INST] Hi [/INST]", " two  spaces", "word</s>"]:
        assert ours.encode(text) == hf(text)["input_ids"], text


A, B, C = ("{{ '" + k + ":' }}{% for m in messages %}{{ m.content }}{% endfor %}" for k in "ABC")


@pytest.mark.parametrize("template, files, want", [
    ({"default": A}, {}, A),                                                       # a dict of named templates
    ([{"name": "default", "template": A}, {"name": "tool_use", "template": B}], {}, A),
    ([{"name": "rag", "template": A}], {}, None),                                  # no default: none to apply
    (None, {"additional_chat_templates/default.jinja": B}, B),                     # v5's template folder
    (A, {"chat_template.jinja": C, "additional_chat_templates/tool_use.jinja": B}, C),
    (A, {"chat_template.json": {"chat_template": B}}, A),                          # a processor's file loses
    (None, {"chat_template.json": {"chat_template": B}}, B),                       # ... unless it is the only one
])  # fmt: skip
def test_chat_template_is_the_one_transformers_applies(tmp_path, template, files, want):
    tcfg = dict(BASE) if template is None else {**BASE, "chat_template": template}
    d = folder(tmp_path, "t", tcfg, files)
    tok, used, _ = normalize_tokenizer(d)
    assert tok["chat_template"] == want
    assert all(name in used for name in files)  # in the provenance's hashes
    if want is not None and "chat_template.json" not in files:
        msgs = [{"role": "user", "content": "hi"}]
        hf = transformers.AutoTokenizer.from_pretrained(str(d))
        assert Tokenizer(tok).apply_chat_template(msgs, False) == hf.apply_chat_template(msgs, tokenize=False)


def test_template_sees_what_transformers_hands_it(tmp_path):
    # the named special tokens that are set (an unset BOS stays undefined), messages without their None fields,
    # and a reasoning field under each name that templates read
    tmpl = ("{% if bos_token is defined %}[bos]{% endif %}[unk={{ unk_token }}][pad={{ pad_token }}]"
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.reasoning_content is defined %}"
            "<think>{{ m.reasoning_content }}|{{ m.thinking }}</think>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")  # fmt: skip
    tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>", "unk_token": "<|eot_id|>",
            "pad_token": "<|end_of_text|>", "chat_template": tmpl}  # fmt: skip
    tok, _, hf = ours_and_theirs(folder(tmp_path, "t", tcfg))
    msgs = [{"role": "system", "content": None}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "reasoning": "greet"}, {"role": "user", "content": "Bye"}]
    ours = Tokenizer(tok).apply_chat_template(msgs)
    assert ours == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert ours.startswith("[unk=<|eot_id|>][pad=<|end_of_text|>]<system><user>Hi")
    assert "<think>greet|greet</think>" in ours
    # a file written before special_tokens existed: the two strings every file has
    old = {k: v for k, v in tok.items() if k != "special_tokens"}
    assert Tokenizer(old).apply_chat_template(msgs).startswith("[unk=][pad=]<system>")


@pytest.mark.parametrize("template", [
    "{{ 1/0 }}", "{{ messages + 1 }}",                                     # the template's own errors
    "{{ 9**99999999 }}", "{{ ('a' * 2000000000)|length }}",                # a hang, 2 GB
    "{{ 'a'.ljust(2000000000) }}", "{{ 'a'|center(1000*1000*1000) }}", "{{ 'a'|indent(2000000000, true) }}",
    "{{ '%2000000000s' % 'a' }}", "{{ '%*s' % (2000000000, 'a') }}", "{{ '%2000000000s'|format('a') }}",
    "{{ '{:>2000000000}'.format('a') }}", "{{ '{:>{w}}'.format('a', w=2000000000) }}",
    "{{ '{a:>{w}}'.format_map({'a': 1, 'w': 2000000000}) }}", "{{ [1, 2]|tojson(indent=300000000) }}",
    "{% set ns = namespace(x=3) %}{% for i in range(30) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
])  # fmt: skip
def test_a_hostile_template_is_one_error(template):
    # a chat template is code from the file: its failures are one TokenizerError, and nothing it asks for may
    # hang or allocate gigabytes
    import resource

    from bitnet158.runtime.tokenizer import TokenizerError

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tok = Tokenizer({"tokenizer_json": (DEMO / "tokenizer.json").read_text(), "chat_template": template,
                     "bos_token": None, "eos_token": None})  # fmt: skip
    with pytest.raises(TokenizerError, match="chat template: "):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_bounded_templates_render_as_jinja_does():
    # the bounds leave ordinary arithmetic, widths and large numbers as values alone
    import jinja2

    tmpl = ("{{ 'ab' * 3 }}{{ 2**10 }}{{ [1]*3 }}{{ 'x'.ljust(5) }}{{ '%d' % 1700000000 }}{{ '%5s'|format('a') }}"
            "{{ 'a'|center(5) }}{{ 1700000000|string }}{{ '{:>3}'.format('b') }}{{ '{:>{w}}'.format('c', w=4) }}"
            "{{ '{a}'.format_map({'a': 7}) }}{{ messages[0]['content'] }}"
            "{{ '|cutoff 20240401, %s' % 'x' }}{{ '|id 1234567: {}'.format('x') }}{{ '|**%s**' % 4000000 }}"
            "{{ '|{{\"budget\": {}}}'.format(4000000) }}{{ '|%%%d' % 5 }}"
            "{{ '|%*d tokens, id %d' % (6, 12, 1700000000) }}"
            "{{ '|{:>{w}} {n}'.format('a', w=4, n=1700000000) }}{{ (('x' * 1000000) + ('y' * 200000))|length }}"
            "{{ '|' ~ (unset|default(1700000000)) }}{{ '|' ~ 'abc'.count('a', 0, 1700000000) }}")
    tok = Tokenizer({"tokenizer_json": (DEMO / "tokenizer.json").read_text(), "chat_template": tmpl,
                     "bos_token": None, "eos_token": None})  # fmt: skip
    msgs = [{"role": "user", "content": "hi"}]
    want = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(tmpl).render(messages=msgs)
    assert tok.apply_chat_template(msgs) == want
    assert want == ("ababab1024[1, 1, 1]x    1700000000    a  a  1700000000  b   c7hi|cutoff 20240401, x"
                    '|id 1234567: x|**4000000**|{"budget": 4000000}|%5|    12 tokens, id 1700000000|   a 1700000000'
                    "1200000|1700000000|1")
