"""Tokenizer from a weight file's tokenizer object (formats/PACKED.md §4): encode, decode, streaming, chat.

The serialized HF ``tokenizers`` tokenizer carries its own post-processor, so ``encode(add_special_tokens=True)``
adds BOS (or not) exactly as the source's HF tokenizer does. Chat templates render the way transformers renders
them (utils/chat_template_utils.py): a jinja2 ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension, the ``{% generation %}`` block (it renders its body; transformers also records where,
for training masks), a non-escaping ``tojson`` filter, ``raise_exception`` / ``strftime_now`` globals, and the
hardened ``dict`` and ``namespace``. A chat template is untrusted code from the file: jinja2 >= 3.1.6 (the first
without the known sandbox escapes, as transformers requires) and no attribute starting with "_" on a namespace.
"""

from __future__ import annotations

import functools
import json
import re
import string
from datetime import datetime
from functools import cached_property

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

# Special tokens that end an assistant turn in common chat formats; in chat mode generation also stops on the
# ones this vocabulary has (2B-4T's config lists only <|end_of_text|> as EOS, its chat turns end in <|eot_id|>).
_TURN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>")


class TokenizerError(ValueError):
    """The tokenizer in a weight file is unusable, or a chat template failed to render."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    # {% generation %}...{% endgeneration %} marks an assistant reply in training templates; rendered, it is its body
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller):
        return caller()


# The most characters, items or digits one operation of a chat template may make: a rendered chat is a few KB, and
# a template from the file must not hang or allocate gigabytes in one step ('a' * 2000000000, 9 ** 99999999,
# 'a'|center(2000000000), '%2000000000s' % 'a', '{:>2000000000}'.format('a'))
_TEMPLATE_MAX_SIZE = 1 << 20
# the str methods and filters whose int arguments size their result (a default(1700000000) is only a value)
_SIZING_METHODS = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_SIZING_FILTERS = frozenset({"center", "indent", "wordwrap", "truncate", "format", "tojson"})
# a %-format's width and precision: "%-10.3f", "%(name)5s", "%*d"
_PERCENT_SPEC = re.compile(r"%(\([^)]*\))?[-+ #0]*(\d+|\*)?(?:\.(\d+|\*))?([a-zA-Z%])")


def _check_ints(*values) -> None:
    if any(isinstance(v, int) and abs(v) > _TEMPLATE_MAX_SIZE for v in values):
        raise jinja2.exceptions.SecurityError("a chat template asked for too large a size")


def _check_format(fmt: str, args=(), kwargs=None, braces: bool = False) -> None:
    # the widths and precisions a format writes, and the arguments it takes them from ("%*s", "{:{w}}"); the values
    # it only prints are not sizes
    sizes, taken = [], []
    if braces:
        try:
            for _, field, spec, _ in string.Formatter().parse(fmt):
                if field is None or not spec:
                    continue
                sizes += re.findall(r"\d+", re.sub(r"\{[^{}]*\}", "", spec))
                for _, inner, _, _ in string.Formatter().parse(spec):  # nested fields: "{:>{w}}", "{:>{0}}", "{:{}}"
                    if inner == "":
                        taken += args  # auto-numbered: which one is not worth tracking
                    elif inner is not None and inner.isdigit():
                        taken.append(args[int(inner)] if int(inner) < len(args) else None)
                    elif inner is not None:
                        taken.append((kwargs or {}).get(re.split(r"[.\[]", inner)[0]))
        except ValueError:  # malformed: str.format raises it itself
            return
    else:
        i = 0
        for key, width, precision, conversion in _PERCENT_SPEC.findall(fmt):
            if conversion == "%":
                continue
            for n in (width, precision):
                if n == "*":
                    taken.append(args[i] if i < len(args) else None)
                    i += 1
                elif n:
                    sizes.append(n)
            i += not key  # the value itself, unless taken from a mapping by its key
    _check_ints(*map(int, sizes), *taken)


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with each operation that can make a huge value bounded by _TEMPLATE_MAX_SIZE, as
    the Jinja docs' sandbox example bounds its operators: ``*`` and ``**`` by their result's size, ``%`` and
    str.format by their widths, the str methods and filters that pad or indent (ljust, center, indent, tojson, ...)
    by their int arguments. A template that builds something huge over many steps (a loop, ``+``, ``~``) is not
    stopped: those grow a value by what already exists (a long prompt renders, however long)."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.filters = {name: _bounded(f) if name in _SIZING_FILTERS else f for name, f in self.filters.items()}

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
            _check_ints(abs(left).bit_length() * right // 4)  # about its number of digits
        elif operator == "*" and isinstance(left, int) and isinstance(right, int):
            _check_ints((abs(left).bit_length() + abs(right).bit_length()) // 4)
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    _check_ints(len(seq) * times)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, right if isinstance(right, tuple) else (right,))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's own signature
        if isinstance(getattr(__obj, "__self__", None), str) and getattr(__obj, "__name__", None) in _SIZING_METHODS:
            _check_ints(*args, *kwargs.values())
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value):  # the sandbox's str.format / format_map, fetched as an attribute
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None

        def bounded(*args, **kwargs):
            if value.__name__ == "format_map":  # its one argument is the mapping of the names
                _check_format(value.__self__, (), args[0] if args and isinstance(args[0], dict) else {}, braces=True)
            else:
                _check_format(value.__self__, args, kwargs, braces=True)
            return fmt(*args, **kwargs)

        return bounded


def _bounded(f):
    # a filter whose int arguments (not its value) are bounded; the format filter's value is its format
    skip = 1 if jinja2.utils._PassArg.from_obj(f) is None else 2  # the value, after a context or environment

    @functools.wraps(f)  # keeps jinja2's pass_context / pass_environment mark
    def bounded(*args, **kwargs):
        _check_ints(*args[skip:], *kwargs.values())
        if f.__name__ == "do_format" and isinstance(args[skip - 1], str):
            _check_format(args[skip - 1], args[skip:], kwargs)
        return f(*args, **kwargs)

    return bounded


class _TemplateDict:
    # ``dict`` in a template: a call and fromkeys, without the class's own attributes to climb through
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    # ``namespace`` in a template, refusing "_" names (a path towards CPython's internals) as transformers does
    def __init__(*args, **kwargs):  # jinja2's signature trick: namespace(self=...) stays a plain attribute
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


class Tokenizer:
    """Wraps ``tokenizers.Tokenizer`` plus the chat template and special-token strings of the file."""

    def __init__(self, tok: dict, eos_token_ids: tuple[int, ...] = ()):
        if not isinstance(tok, dict) or not isinstance(tok.get("tokenizer_json"), str):
            raise TokenizerError("tokenizer: the file has no tokenizer_json string")
        try:
            self._tok = HFTokenizer.from_str(tok["tokenizer_json"])
            # Some inconsistent files load, then panic on first use (a post-processor naming a token that the
            # vocabulary lacks): used once here, such a file fails at load, not in the middle of a generation
            self._tok.decode(self._tok.encode("a 1", add_special_tokens=True).ids)
        except BaseException as e:  # tokenizers raises a bare Exception, or a Rust panic (a BaseException)
            if not isinstance(e, Exception) and type(e).__module__ != "pyo3_runtime":
                raise
            raise TokenizerError(f"tokenizer: tokenizer_json does not load or does not work: {e}") from e
        self.chat_template: str | None = tok.get("chat_template")
        self.bos_token: str | None = tok.get("bos_token")
        self.eos_token: str | None = tok.get("eos_token")
        # the special-token strings a chat template sees: those the converter took from transformers (unk_token,
        # pad_token, ...), else the two every file has; one that is not set stays undefined, as in transformers
        named = tok.get("special_tokens")
        if not isinstance(named, dict):
            named = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        self.special_tokens: dict[str, str] = {k: v for k, v in named.items() if isinstance(v, str)}
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    @cached_property
    def max_id(self) -> int:
        """The largest id the tokenizer can produce (its added tokens included); the vocabulary's dict is built
        once (2B-4T: 128k entries)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (BOS as the HF tokenizer)."""
        if not isinstance(text, str):
            raise TypeError(f"the text to encode must be a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            # Input bytes that are not UTF-8 (argv, stdin) reach Python as lone surrogates (surrogateescape), which
            # tokenizers refuses as "TextInputSequence must be str": say what is wrong with the text instead
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise TokenizerError("the text holds bytes that are not UTF-8") from None
            raise

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list of ints or a 1-D tensor)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_stop_ids(self) -> tuple[int, ...]:
        """Ids that end a chat turn: the config's EOS ids, the eos_token and known end-of-turn specials."""
        ids = list(self.eos_token_ids)
        for tok in (self.eos_token, *_TURN_END_TOKENS):
            i = self._tok.token_to_id(tok) if tok else None
            if i is not None and i not in ids:
                ids.append(i)
        return tuple(ids)

    @cached_property
    def _template(self) -> jinja2.Template:
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
        env.filters["tojson"] = _bounded(_tojson)  # (its indent)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                           namespace=_Namespace)  # fmt: skip
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise TokenizerError(f"chat template: syntax error at line {e.lineno}: {e.message}") from e

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role", "content"}]) with the file's chat template, as transformers does."""
        if not self.chat_template:
            raise TokenizerError("this model file carries no chat template")
        if not all(isinstance(m, dict) for m in messages):
            raise TokenizerError("chat messages must be dicts ({'role': ..., 'content': ...})")
        # as transformers: keys whose value is None dropped (templates test for a missing key, and print "None"),
        # a message's reasoning under each name that templates read
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from e
        except Exception as e:  # the template's own arithmetic or types ({{ 1/0 }}): code from the file, one error
            raise TokenizerError(f"chat template: {type(e).__name__}: {e}") from e

    def stream(self, prompt_ids: list[int] = (), skip_special_tokens: bool = True) -> "StreamDecoder":
        """An incremental detokenizer for tokens that follow ``prompt_ids``."""
        return StreamDecoder(self, prompt_ids, skip_special_tokens)


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    # transformers' _alias_reasoning_fields: the first reasoning field set, also as "thinking" (gpt-oss templates)
    # and "reasoning_content"
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


# a byte-fallback token (SentencePiece's <0xXX>) of a UTF-8 continuation byte, 0x80-0xBF: not a character's start
_CONTINUATION_BYTE = re.compile(r"<0x[89AB][0-9A-F]>")


class StreamDecoder:
    """Turns a stream of token ids into text pieces, emitting text only once it is stable.

    Decoding a token alone is wrong twice over: a multi-byte UTF-8 character split across byte-level tokens decodes
    to U+FFFD until its last byte arrives, and SentencePiece-style decoders drop the leading space of the first
    token of a sequence. So, like vLLM's detokenizer, we decode a short window that starts a few tokens back
    (``prefix``) and emit what the new tokens added to it, holding back while the text ends in U+FFFD.

    The first window must not start inside a character that SentencePiece spelled as byte-fallback tokens
    (``<0xF0><0x9F><0x8D><0x95>`` for 🍕): the ByteFallback decoder decodes each run of byte tokens as one, so a
    run cut at its start, and every new byte token that joins it (``<0x0A>`` for a newline), would come out as
    U+FFFD. So it starts at the character's first byte. Later windows start where emitted text ended: on a
    character boundary.
    """

    _CONTEXT = 6  # tokens of already-emitted text kept in front of the window

    def __init__(self, tokenizer: Tokenizer, prompt_ids=(), skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        prompt_ids = list(prompt_ids)
        start = max(0, len(prompt_ids) - self._CONTEXT)
        while start > 0 and _CONTINUATION_BYTE.fullmatch(tokenizer.id_to_token(prompt_ids[start]) or ""):
            start -= 1
        self._ids: list[int] = prompt_ids[start:]
        self._prefix = 0  # window start
        self._read = len(self._ids)  # tokens before this index are already emitted

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly stable text (possibly "")."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Slide the window: the tokens emitted just now become the context for the next ones.
        self._prefix, self._read = self._read, len(self._ids)
        if len(self._ids) > 4 * self._CONTEXT:  # keep the list short: only the window matters
            drop = self._prefix
            self._ids = self._ids[drop:]
            self._prefix -= drop
            self._read -= drop
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever text is still held back at the end of the stream (e.g. an incomplete character as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
