"""The tokenizer: a tiny byte-level BPE built in code, and the real SmolLM2 tokenizer checked
against transformers (ids, decoding, chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from router.text.tokenizer import Tokenizer, compile_chat_template

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. hello there!"] * 20
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int = 300) -> HFTokenizer:
    """Byte-level BPE with few merges: non-ASCII characters split into one token per byte."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_model_dir(path: Path, tokenizer_config: dict, **files: dict | str) -> Path:
    """A model directory: tokenizer.json, tokenizer_config.json and any extra files."""
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in files.items():
        name = name.replace("__", ".")
        text = content if isinstance(content, str) else json.dumps(content)
        (path / name).write_text(text)
    return path


@pytest.fixture()
def tiny(tmp_path) -> Tokenizer:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "unk_token": "<unk>",
        "chat_template": CHATML,
    }
    return Tokenizer.from_dir(write_model_dir(tmp_path, config))


# ---- the tiny tokenizer ----


def test_encode_decode_roundtrip(tiny):
    text = "hello wörld 😀 日本語 <|im_end|>"
    ids = tiny.encode(text)
    assert tiny.decode(ids, skip_special_tokens=False) == text
    assert tiny.decode(ids) == "hello wörld 😀 日本語 "
    assert ids[-1] == tiny.token_to_id("<|im_end|>")
    assert len(tiny.encode("😀", add_special_tokens=False)) == 4  # one token per byte


def test_special_tokens_and_vocab(tiny):
    assert tiny.bos_token == "<s>" and tiny.eos_token == "</s>"
    assert tiny.bos_token_id == 1
    assert tiny.eos_token_ids == {2}
    assert [tiny.is_special(i) for i in range(5)] == [True] * 5
    assert not tiny.is_special(tiny.encode("hello")[0])
    assert tiny.id_to_token(4) == "<|im_end|>"
    assert tiny.vocab_size == 300
    assert tiny.id_to_token(tiny.vocab_size) is None


def test_post_processor_of_tokenizer_json_is_honoured(tmp_path):
    """Not a Llama class: add_bos_token in the config does not override tokenizer.json."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "add_bos_token": True,
    }
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, config))
    assert tok.encode("hello") == tok.encode("hello", add_special_tokens=False)


@pytest.mark.parametrize(
    "config, prefix, suffix",
    [
        ({}, ["<s>"], []),  # TGI: add_bos_token defaults to true for Llama tokenizers
        ({"add_bos_token": False}, [], []),
        ({"add_bos_token": True, "add_eos_token": True}, ["<s>"], ["</s>"]),
        ({"add_bos_token": False, "add_eos_token": True}, [], ["</s>"]),
        ({"bos_token": "<not-in-vocab>"}, [], []),
    ],
)
def test_llama_post_processor_from_config(tmp_path, config, prefix, suffix):
    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        **config,
    }
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, config))
    plain = tok.encode("hello", add_special_tokens=False)
    wrap = [tok.token_to_id(t) for t in prefix], [tok.token_to_id(t) for t in suffix]
    assert tok.encode("hello") == wrap[0] + plain + wrap[1]


def test_eos_ids_from_every_config(tmp_path):
    config = {"eos_token": "</s>"}
    tok = Tokenizer.from_dir(
        write_model_dir(
            tmp_path,
            config,
            generation_config__json={"eos_token_id": [4, 2]},
            config__json={"eos_token_id": 3},
        )
    )
    assert tok.eos_token_ids == {2, 3, 4}


def test_special_tokens_map_fills_in(tmp_path):
    tok = Tokenizer.from_dir(
        write_model_dir(
            tmp_path,
            {},
            special_tokens_map__json={"bos_token": {"content": "<s>"}, "eos_token": "</s>"},
        )
    )
    assert (tok.bos_token, tok.eos_token, tok.eos_token_ids) == ("<s>", "</s>", {2})


# ---- chat templates ----


def test_chat_template_renders(tiny):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tiny.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_tokenizer_config_path_replaces_the_models_config(tmp_path):
    """TGI's --tokenizer-config-path: its chat template wins, even over chat_template.jinja;
    the tokenizer sent to a worker process loads the same file."""
    import pickle

    model = write_model_dir(
        tmp_path / "m", {"chat_template": "model", "eos_token": "</s>"}, chat_template__jinja="file"
    )
    override = tmp_path / "override.json"
    override.write_text(json.dumps({"chat_template": "override", "bos_token": "<s>"}))
    tok = Tokenizer.from_dir(model, str(override))
    assert tok.chat_template == "override" and tok.bos_token == "<s>"
    assert tok.eos_token is None  # the model's tokenizer_config.json is not read
    assert pickle.loads(pickle.dumps(tok)).chat_template == "override"
    no_template = tmp_path / "plain.json"
    no_template.write_text(json.dumps({"bos_token": "<s>"}))
    assert Tokenizer.from_dir(model, str(no_template)).chat_template == "file"


def test_chat_template_file_wins_and_named_list(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    tok = Tokenizer.from_dir(write_model_dir(tmp_path / "a", {"chat_template": named}))
    assert tok.chat_template == "D"
    tok = Tokenizer.from_dir(
        write_model_dir(tmp_path / "b", {"chat_template": "config"}, chat_template__jinja="file")
    )
    assert tok.chat_template == "file"


def test_no_chat_template_is_a_clear_error(tmp_path):
    tok = Tokenizer.from_dir(write_model_dir(tmp_path, {}))
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_variables(tiny):
    tiny.chat_template = (
        "{{ bos_token }}{{ messages | length }}{{ eos_token }}"
        "{{ tools is none }}{{ extra }}{{ messages[0] | tojson }}"
    )
    out = tiny.apply_chat_template([{"role": "user", "content": "<é>", "name": None}], extra="!")
    assert out == '<s>1</s>True!{"role": "user", "content": "<é>"}'  # None keys dropped


def render(source: str, **variables) -> str:
    return compile_chat_template(source).render(**variables)


def test_template_globals_and_extensions():
    assert render("{{ strftime_now('%Y') | length }}") == "4"
    assert render("{{ {'a': [1, 2]} | tojson(indent=1) }}") == '{\n "a": [\n  1,\n  2\n ]\n}'
    loop = "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render(loop) == "012"
    assert render("{% generation %}x{% endgeneration %}y") == "xy"
    assert render("{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.n }}") == "2"
    assert render("  {% if true %}\nA{% endif %}\n") == "A"  # trim_blocks + lstrip_blocks
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        render("{{ raise_exception('bad role') }}")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__.__mro__ }}",
        "{% set x = messages.__class__ %}{{ x.__base__ }}",
        "{{ raise_exception.__globals__['os'] }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutation of the inputs
        "{% set ns = namespace(__dict__=1) %}",
    ],
)
def test_sandbox_blocks_escapes(source):
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(source, messages=[])


def test_sandbox_unsafe_attribute_renders_nothing():
    assert render("[{{ ''.__class__ }}][{{ raise_exception.__globals__ }}]") == "[][]"


# ---- the real SmolLM2 tokenizer, against transformers ----

STRINGS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnewlines",
    "Ünïcödé café naïve",
    "😀👍🏽👨‍👩‍👧 emoji",
    "日本語のテキストと中文",
    "<|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # comment",
    "",
    " ",
    "a<|endoftext|>b",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 😀"},
    ],
    [{"role": "user", "content": "ünïcödé\nmulti\nline"}, {"role": "assistant", "content": ""}],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    import transformers  # the oracle; a dependency of the project, never skipped

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize("text", STRINGS)
def test_smollm2_ids_match_transformers(smollm2, smollm2_hf, text):
    for add in (True, False):
        ids = smollm2_hf(text, add_special_tokens=add)["input_ids"]
        assert smollm2.encode(text, add_special_tokens=add) == ids
    assert smollm2.decode(ids) == smollm2_hf.decode(ids, skip_special_tokens=True)
    assert smollm2.decode(ids, False) == smollm2_hf.decode(ids, skip_special_tokens=False)


@pytest.mark.slow
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_hf, messages):
    for gen in (True, False):
        expected = smollm2_hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=gen
        )
        assert smollm2.apply_chat_template(messages, add_generation_prompt=gen) == expected


@pytest.mark.slow
def test_smollm2_special_tokens(smollm2, smollm2_hf):
    """No BOS is added; BOS is <|im_start|> (1), EOS <|im_end|> (2); ids 0-16 are special."""
    assert smollm2.encode("Hi") == smollm2.encode("Hi", add_special_tokens=False)
    assert (smollm2.bos_token, smollm2.bos_token_id) == ("<|im_start|>", 1)
    assert smollm2.eos_token == "<|im_end|>" and smollm2.eos_token_ids == {2}
    assert smollm2.vocab_size == len(smollm2_hf) == 49152
    assert [i for i in range(100) if smollm2.is_special(i)] == list(range(17))
    assert smollm2.chat_template == smollm2_hf.chat_template
