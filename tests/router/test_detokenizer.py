"""Incremental detokenizer: multi-byte characters, exact concatenation, bounded work."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from router.text.detokenizer import (
    MAX_PENDING_TOKENS,
    PROMPT_CONTEXT_TOKENS,
    IncrementalDetokenizer,
)
from router.text.tokenizer import Tokenizer
from tests.router.test_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer(build_tiny_tokenizer())


def stream(tokenizer, prompt_ids: Sequence[int], ids: Sequence[int], **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    return [detokenizer.step(i) for i in ids]


def test_emoji_split_into_bytes_comes_out_whole(tiny):
    ids = tiny.encode("hi 😀!", add_special_tokens=False)
    assert len(ids) == 8  # "h", "i", " ", four byte tokens, "!"
    assert stream(tiny, tiny.encode("hello"), ids) == ["h", "i", " ", "", "", "", "😀", "!"]


@pytest.mark.parametrize("text", ["é", "日本語", "😀👍🏽", "naïve café", "👨‍👩‍👧"])
def test_partial_steps_yield_empty_strings(tiny, text):
    """One token per byte: each character comes out whole at its last byte, "" before."""
    ids = tiny.encode(text, add_special_tokens=False)
    pieces = stream(tiny, [], ids)
    assert [p for p in pieces if p] == list(text)
    assert pieces.count("") == len(text.encode()) - len(text)


def test_prompt_context_keeps_leading_space():
    """A Metaspace decoder drops the leading space of a lone first token: context restores it."""
    words = HFTokenizer(models.WordLevel({"▁hello": 0, "▁world": 1, "<unk>": 2}, "<unk>"))
    words.pre_tokenizer, words.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = Tokenizer(words)
    assert tokenizer.decode([1]) == "world"
    assert stream(tokenizer, [0], [1, 1]) == [" world", " world"]


def test_special_tokens_in_stream(tiny):
    ids = tiny.encode("hi<|im_end|>", add_special_tokens=False)
    assert stream(tiny, [], ids)[-1] == "<|im_end|>"
    assert "".join(stream(tiny, [], ids, skip_special_tokens=True)) == "hi"


def test_prompt_ending_inside_a_character(tiny):
    """The prompt context is left out, so orphan bytes come out as decode() shows them."""
    emoji = tiny.encode("😀", add_special_tokens=False)
    prompt = tiny.encode("hello", add_special_tokens=False) + emoji[:3]
    ids = [emoji[3]] + tiny.encode("b", add_special_tokens=False)
    assert "".join(stream(tiny, prompt, ids)) == tiny.decode(ids, False) == "\ufffdb"


def test_an_incomplete_character_is_held(tiny):
    ids = tiny.encode("a😀", add_special_tokens=False)[:-1]  # cut the emoji's last byte
    detokenizer = IncrementalDetokenizer(tiny, [])
    assert "".join(detokenizer.step(i) for i in ids) == "a"
    assert detokenizer.num_pending == 3
    assert tiny.decode(ids, False) == "a\ufffd"  # what is held is the incomplete character


class CountingDecoder:
    """Wraps a tokenizer and records the length of every window it decodes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens)


def test_work_per_token_is_bounded(tiny):
    decoder = CountingDecoder(tiny)
    prompt = tiny.encode("hello " * 1000, add_special_tokens=False)
    ids = tiny.encode("the quick brown 日本 😀 fox " * 500, add_special_tokens=False)
    pieces = stream(decoder, prompt, ids)
    assert "".join(pieces) == tiny.decode(ids, skip_special_tokens=False)
    assert max(decoder.lengths) <= PROMPT_CONTEXT_TOKENS + 2 * 4  # 4 bytes per character
    assert len(decoder.lengths) <= 2 * len(ids)


def test_replacement_characters_do_not_grow_the_window(tiny):
    """A model emitting lone continuation bytes forever: emitted every MAX_PENDING_TOKENS."""
    continuation = tiny.encode("😀", add_special_tokens=False)[-1]  # the byte 0x80
    decoder = CountingDecoder(tiny)
    detokenizer = IncrementalDetokenizer(decoder, [])
    pieces = [detokenizer.step(continuation) for _ in range(100)]
    assert pieces.count("") == 100 - 100 // MAX_PENDING_TOKENS
    emitted = 100 - 100 % MAX_PENDING_TOKENS
    assert "".join(pieces) == "\ufffd" * emitted
    assert detokenizer.num_pending == 100 % MAX_PENDING_TOKENS
    assert max(decoder.lengths) <= 2 * MAX_PENDING_TOKENS


# ---- the real SmolLM2 tokenizer ----

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    " \n\t.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`",
    "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿœßÀÉÎÕÜ",
    "日本語中文字漢字のテキスト한국어",
    "αβγδεζηθλμπσωАБВГДЕЖЗабвгдежз",
    "العربيةעבריתहिन्दीไทย",
    "😀😂🥲👍🏽👨‍👩‍👧🇫🇷🎉🚀❤️✨🤖",
    "∑∫√∞≈≠≤≥→⇒€£¥©®™",
]


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "".join(rng.sample(ALPHABETS, k=rng.randint(1, len(ALPHABETS))))
    return "".join(rng.choice(alphabet) for _ in range(length))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_dir(smollm2_dir)


@pytest.mark.slow
def test_smollm2_random_multilingual_strings(smollm2):
    rng = random.Random(0)
    prompt = smollm2.encode(smollm2.apply_chat_template([{"role": "user", "content": "Hi"}]))
    for _ in range(300):
        text = random_text(rng, rng.randint(1, 80))
        ids = smollm2.encode(text, add_special_tokens=False)
        pieces = stream(smollm2, prompt, ids)
        assert "".join(pieces) == smollm2.decode(ids, skip_special_tokens=False) == text
        assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.slow
@pytest.mark.parametrize(
    "text, pieces",
    [
        (" 😀", ["", " 😀"]),  # 'ĠðŁĺ' + 'Ģ'
        (" 日本語", ["", "", " 日", "本", "", "", "語"]),
        ("Ünïcödé café", ["", "Ü", "n", "ï", "c", "ö", "d", "é", " café"]),
        (" 한국어", [" ", "", "한", "", "", "국", "", "", "어"]),
        (" 👨‍👩‍👧", ["", "", " 👨", "", "\u200d", "", "", "👩", "", "\u200d", "", "", "👧"]),
    ],
)
def test_smollm2_multibyte_tokens(smollm2, text, pieces):
    ids = smollm2.encode(text, add_special_tokens=False)
    assert stream(smollm2, smollm2.encode("Say:"), ids) == pieces


@pytest.mark.slow
def test_smollm2_random_token_ids(smollm2):
    """Any ids, specials and invalid UTF-8 included (half the runs draw from the one-byte
    tokens, to split characters everywhere): the stream is decode's text, all of it once no
    incomplete character is pending."""
    rng = random.Random(1)
    one_byte = [i for i in range(smollm2.vocab_size) if len(smollm2.id_to_token(i)) == 1]
    for n in range(400):
        pool = one_byte if n % 2 else range(smollm2.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 60))]
        prompt = [rng.choice(pool) for _ in range(rng.randint(0, 8))]
        for skip in (False, True):
            detokenizer = IncrementalDetokenizer(smollm2, prompt, skip_special_tokens=skip)
            text = "".join(detokenizer.step(i) for i in ids)
            full = smollm2.decode(ids, skip_special_tokens=skip)
            assert full.startswith(text)
            assert detokenizer.num_pending < MAX_PENDING_TOKENS
            if not detokenizer.num_pending:
                assert text == full
