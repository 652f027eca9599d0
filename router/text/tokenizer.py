"""The router's tokenizer: a `tokenizers.Tokenizer` plus what the model directory says about
special tokens, BOS/EOS and the chat template. Never imports torch or transformers.

Rules, as TGI and transformers apply them:
- Encoding honours the post-processor in tokenizer.json (SmolLM2 adds no BOS). Only for
  `tokenizer_class` LlamaTokenizer(Fast) is it rebuilt from `add_bos_token` (default true) and
  `add_eos_token` (default false) in tokenizer_config.json, as TGI's router does.
- Truncation and padding stored in tokenizer.json are switched off: validation truncates.
- The chat template comes from `chat_template.jinja` if present, else tokenizer_config.json's
  `chat_template` (a string, or a list of named templates of which "default" is used). It is
  rendered in jinja2's immutable sandbox with the globals transformers provides.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.processors import TemplateProcessing

LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """Encode, decode, special tokens and chat template of one model directory."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        config: dict[str, Any] | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ):
        self._tokenizer = tokenizer
        self.config = config or {}
        self.special_tokens = {
            name: token
            for name in SPECIAL_TOKEN_NAMES
            if (token := _token_content(self.config.get(name))) is not None
        }
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self.eos_token_ids: set[int] = set(eos_token_ids)
        if self.eos_token is not None and (eos_id := self.token_to_id(self.eos_token)) is not None:
            self.eos_token_ids.add(eos_id)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | Path, config_path: str | None = None) -> Tokenizer:
        """Loads tokenizer.json, tokenizer_config.json (or `config_path`, TGI's
        --tokenizer-config-path) and the files that name BOS/EOS ids."""
        path = Path(path)
        config_file = Path(config_path) if config_path else path / "tokenizer_config.json"
        tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        config = {
            **_read_json(path / "special_tokens_map.json"),
            **_read_json(config_file),
        }
        if config.get("tokenizer_class") in LLAMA_TOKENIZER_CLASSES:
            _set_llama_post_processor(tokenizer, config)
        eos_ids = [
            i
            for name in ("generation_config.json", "config.json")
            for i in _as_ids(_read_json(path / name).get("eos_token_id"))
        ]
        # A chat template in the given tokenizer config wins over the model's own files.
        own_files = not (config_path and config.get("chat_template"))
        template = _load_chat_template(path if own_files else None, config)
        loaded = cls(tokenizer, config, eos_ids, template)
        loaded.path, loaded.config_path = str(path), config_path
        return loaded

    path: str | None = None  # the directory it was loaded from
    config_path: str | None = None  # the tokenizer_config.json that replaced the directory's

    def __reduce__(self):
        """Pickled as its directory: a tokenization worker process loads it once and then
        reuses it (`load_tokenizer`), so sending it with every call costs nothing."""
        if self.path is None:
            raise TypeError("only a Tokenizer loaded with from_dir can be sent to a process")
        return load_tokenizer, (self.path, self.config_path)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token is not None else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (every valid id is below it)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._encode(text, add_special_tokens).ids

    def encode_tail(
        self, text: str, add_special_tokens: bool, keep: int | None, limit: int
    ) -> tuple[int, list[int]]:
        """(number of tokens of `text`, its last `keep` ids, or all without `keep`). The ids
        are [] when more than `limit` would be kept: the caller refuses such an input on its
        length, and making a Python list of a million ids holds the GIL for ~50 ms."""
        encoding = self._encode(text, add_special_tokens)
        length = len(encoding)
        kept = length if keep is None else min(length, keep)
        return length, (encoding.ids[length - kept :] if kept <= limit else [])

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> list[tuple[int, tuple[int, int]]]:
        """(id, (start, stop)) per token, offsets in characters of `text` (for /tokenize)."""
        encoding = self._encode(text, add_special_tokens)
        return list(zip(encoding.ids, encoding.offsets))

    def _encode(self, text: str, add_special_tokens: bool) -> tokenizers.Encoding:
        """The batch call with one text: unlike `encode`, it releases the GIL while it works,
        so a long prompt tokenized on a worker thread never stalls the event loop."""
        return self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def pieces_json(self, text: str, add_special_tokens: bool = True) -> str:
        """/tokenize's answer: `[{"id", "text", "start", "stop"}, ...]` as JSON text."""
        pieces = self.encode_with_offsets(text, add_special_tokens)
        return json.dumps(
            [{"id": i, "text": text[a:b], "start": a, "stop": b} for i, (a, b) in pieces]
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """True for added tokens marked special (those `skip_special_tokens` drops)."""
        return token_id in self._special_ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Renders a conversation as transformers' `apply_chat_template(..., tokenize=False)`.

        kwargs become template variables (e.g. `tools`, `documents`, `enable_thinking`).
        Keys whose value is None are dropped from each message, as transformers does.
        """
        if self.chat_template is None:
            raise ValueError(
                "This model has no chat template (no `chat_template` in "
                "tokenizer_config.json and no chat_template.jinja)"
            )
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens, **kwargs}
        return compile_chat_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )


@lru_cache(maxsize=4)
def load_tokenizer(path: str, config_path: str | None = None) -> Tokenizer:
    """The tokenizer of a directory, loaded once per process."""
    return Tokenizer.from_dir(path, config_path)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """A special token from a config: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(i) for i in value]


def _set_llama_post_processor(tokenizer: tokenizers.Tokenizer, config: dict[str, Any]) -> None:
    """TGI's `create_post_processor`: BOS/EOS from tokenizer_config's add_bos/add_eos_token."""
    bos = (
        _known_token(tokenizer, config, "bos_token") if config.get("add_bos_token", True) else None
    )
    eos = (
        _known_token(tokenizer, config, "eos_token") if config.get("add_eos_token", False) else None
    )

    def template(sequence: str, type_id: int) -> str:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"${sequence}:{type_id}")
        return " ".join(parts + ([f"{eos}:{type_id}"] if eos else []))

    single = template("A", 0)
    specials = [(t, tokenizer.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t]
    tokenizer.post_processor = TemplateProcessing(
        single=single, pair=f"{single} {template('B', 1)}", special_tokens=specials
    )


def _known_token(tokenizer: tokenizers.Tokenizer, config: dict[str, Any], name: str) -> str | None:
    token = _token_content(config.get(name))
    return token if token is not None and tokenizer.token_to_id(token) is not None else None


def _load_chat_template(path: Path | None, config: dict[str, Any]) -> str | None:
    """path/chat_template.jinja wins over tokenizer_config.json, as in transformers."""
    jinja_file = path / "chat_template.jinja" if path is not None else None
    if jinja_file is not None and jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default")
    return template


# ---- chat template rendering (the same environment as transformers' chat_template_utils) ----


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (assistant-mask marker)."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Unlike jinja's own `tojson`, does not HTML-escape (transformers' override)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compiles a chat template in an immutable sandbox (cached per template text)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_SafeNamespace
    )
    return env.from_string(source)
