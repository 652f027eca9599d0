"""Constrained decoding on the real tokenizer: masks for a JSON schema and a regex that only
ever let a valid text through, a mixed batch where only one row is constrained, and grammars
that do not compile."""

from __future__ import annotations

import json
import types

import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from common.grammar import GRAMMAR_JSON, GRAMMAR_REGEX, GrammarError
from pb import generate_pb2 as pb
from shard.engine.batch import InvalidRequest, request_from_pb
from shard.engine.generator import FINISH_EOS, Generator
from shard.sampling.grammar import GrammarCompiler

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    eos = config["eos_token_id"]
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    compiler = GrammarCompiler(smollm2_dir / "tokenizer.json", config["vocab_size"], eos)
    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return types.SimpleNamespace(compiler=compiler, tokenizer=tokenizer, eos=eos, config=config)


def walk(model, kind: int, grammar: str, seed: int, steps: int = 300) -> tuple[str, bool]:
    """Random logits, masked, argmax, until the grammar completes: (the text, completed)."""
    state = model.compiler.state(kind, grammar)
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(steps):
        logits = torch.randn(model.config["vocab_size"], generator=generator)
        state.mask(logits)
        token = int(logits.argmax())
        assert torch.isfinite(logits[token])
        if token in model.eos:
            return model.tokenizer.decode(tokens), True
        tokens.append(token)
        if state.accept(token):
            return model.tokenizer.decode(tokens), True
    return model.tokenizer.decode(tokens), False


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_masks_only_let_valid_documents_through(model, seed):
    text, completed = walk(model, GRAMMAR_JSON, json.dumps(PERSON), seed)
    assert completed, text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", range(3))
def test_regex_masks_only_let_matches_through(model, seed):
    import re

    pattern = r"[0-9]{3}-(yes|no)"
    text, completed = walk(model, GRAMMAR_REGEX, pattern, seed)
    assert completed and re.fullmatch(pattern, text), text


def test_complete_grammar_allows_only_eos(model):
    state = model.compiler.state(GRAMMAR_REGEX, "ok")
    for token in model.tokenizer.encode("ok", add_special_tokens=False).ids:
        state.accept(token)
    assert state.allowed().nonzero().flatten().tolist() == list(model.eos)


def test_grammars_are_compiled_once_and_copied_per_request(model):
    a = model.compiler.state(GRAMMAR_REGEX, "[ab]+")
    b = model.compiler.state(GRAMMAR_REGEX, "[ab]+")
    assert a.matcher is not b.matcher
    a.accept(model.tokenizer.encode("a", add_special_tokens=False).ids[0])
    assert not torch.equal(a.allowed(), b.allowed())  # b did not move with a


@pytest.mark.parametrize(
    "kind,grammar",
    [(GRAMMAR_REGEX, "a(b"), (GRAMMAR_JSON, "{not json"), (GRAMMAR_JSON, '{"type": 5}')],
)
def test_grammars_that_do_not_compile_are_refused(model, kind, grammar):
    with pytest.raises(GrammarError):
        model.compiler.state(kind, grammar)
    request = new_request(0, kind, grammar)
    with pytest.raises(InvalidRequest, match="grammar does not compile"):
        request_from_pb(request, 16, 100, model.config["vocab_size"], model.compiler)


def new_request(request_id: int, kind: int = 0, grammar: str = "") -> pb.Request:
    return pb.Request(
        id=request_id,
        input_ids=[1, 2, 3],
        blocks=[request_id + 1],
        parameters=pb.NextTokenChooserParameters(
            temperature=1.0, top_p=1.0, typical_p=1.0, grammar=grammar, grammar_type=kind
        ),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=50),
    )


def test_only_the_constrained_row_of_a_batch_is_masked(model):
    vocab = model.config["vocab_size"]
    free = request_from_pb(new_request(0), 16, 100, vocab, model.compiler)
    digits = request_from_pb(new_request(1, GRAMMAR_REGEX, "[0-9]"), 16, 100, vocab, model.compiler)
    generator = Generator(None, model.eos, 100, grammars=model.compiler)
    plan = types.SimpleNamespace(active=[free, digits], sample_rows=[(0, 0), (1, 1)])
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(1))
    generations = generator._choose_tokens(plan, logits)
    assert generations[0].token_id == int(logits[0].argmax())  # untouched
    digit = model.tokenizer.decode([generations[1].token_id])
    assert digit.isdigit() and len(digit) == 1
    assert generations[1].finish_reason == FINISH_EOS  # the grammar is complete after one digit
    assert generations[0].finish_reason is None


@pytest.mark.parametrize("vocab", [64, 100, 49152])
def test_mask_kernel_matches_masked_fill(model, vocab):
    """grammar_mask.c against its reference, on random bitmasks with whole words of allowed
    and of forbidden tokens, and a last partial word."""
    state = model.compiler.state(GRAMMAR_REGEX, "[0-9]+")
    state.vocab_size = vocab
    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bits = torch.randint(-(2**31), 2**31, (words,), dtype=torch.int64, generator=generator)
    bits[: words // 3] = -1  # every token of these words allowed
    bits[words // 3 : words // 2] = 0  # none of these
    state._bits = bits.to(torch.int32).numpy()
    state._compute = lambda: None  # keep these bits
    logits = torch.randn(vocab, generator=generator)
    expected = logits.clone()
    state.mask_reference(expected)
    state.mask(logits)
    assert torch.equal(logits, expected)
    assert torch.isinf(expected).any() and torch.isfinite(expected).any()


def test_a_row_off_the_cpu_never_reaches_the_kernel(model, monkeypatch):
    """On a GPU the logits row is device memory, which the C kernel cannot write: the
    reference masks it there (a meta tensor stands in for a CUDA one)."""
    from shard.sampling import grammar

    state = model.compiler.state(GRAMMAR_REGEX, "[0-9]+")
    monkeypatch.setattr(grammar, "_mask_kernel", lambda: pytest.fail("kernel called"))
    row = torch.empty(model.compiler.vocab_size, device="meta")
    state.mask(row)
    assert row.device.type == "meta"


def test_tool_set_masks_only_let_calls_through(model):
    """The grammar the router makes of a request's tools, walked on the real tokenizer: every
    answer is a call of one of the tools, with the arguments it declares."""
    from router.http.tool_calls import ToolCall, parse_answer, parse_tools, tool_grammar
    from router.validation.grammar import check_grammar

    city = {"type": "string", "maxLength": 10}
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": city}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time"}},
    ]  # fmt: skip
    grammar = check_grammar(tool_grammar(parse_tools(tools, "required", None)))
    for seed in range(3):
        text, completed = walk(model, grammar.type, grammar.value, seed)
        assert completed, text
        call = parse_answer(text)
        assert isinstance(call, ToolCall), text
        arguments = json.loads(call.arguments)
        assert (call.name, set(arguments)) in (("get_weather", {"city"}), ("get_time", set()))
