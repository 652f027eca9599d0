"""Tool calls: which functions a request may call, the grammar of a call (it compiles, and the
answers it allows are calls), and the answer turned into tool_calls, whole and streamed in
pieces of every size, as the openai client accumulates them."""

from __future__ import annotations

import json

import jsonschema
import pytest

from router.errors import ToolError
from router.http.tool_calls import (
    DEFAULT_TOOL_PROMPT,
    NO_TOOL,
    ToolCall,
    ToolCallStream,
    parse_answer,
    parse_tools,
    tool_grammar,
    with_tools,
)
from router.validation.grammar import check_grammar

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters at all


def test_tool_choice_picks_the_functions():
    assert parse_tools([WEATHER], "none", None) is None
    assert parse_tools(None, "auto", None) is None
    auto = parse_tools([WEATHER, CLOCK], None, None)
    assert auto.choice == "auto" and [f["name"] for f in auto.functions] == ["get_weather", "now"]
    assert auto.prompt == DEFAULT_TOOL_PROMPT
    assert parse_tools([WEATHER, CLOCK], "required", "p").choice == "required"
    for named in ("now", {"type": "function", "function": {"name": "now"}}):
        tools = parse_tools([WEATHER, CLOCK], named, None)
        assert [f["name"] for f in tools.functions] == ["now"]


@pytest.mark.parametrize(
    "tools, choice, detail",
    [
        ([WEATHER], "missing", "Tool with name missing not found"),
        ([WEATHER], {"type": "function"}, "tool_choice must be"),
        ([{"type": "function", "function": {}}], "auto", "tools[0].function.name"),
        ([{"type": "retrieval"}], "auto", "tools[0] must be"),
        ([{"type": "function", "function": {"name": NO_TOOL}}], "auto", "other than no_tool"),
        ([{"function": {"name": "f", "parameters": []}}], "auto", "parameters must be"),
    ],
)
def test_bad_tools_are_tool_errors(tools, choice, detail):
    with pytest.raises(ToolError, match="Tool error") as info:
        parse_tools(tools, choice, None)
    assert detail in info.value.detail


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_the_grammar_compiles_and_allows_only_calls(choice):
    grammar = tool_grammar(parse_tools([WEATHER, CLOCK], choice, None))
    check_grammar(grammar)  # raises where llguidance or the meta-schema refuse it
    schema = grammar.value
    jsonschema.validate({"function": {"_name": "get_weather", "city": "Oslo"}}, schema)
    jsonschema.validate({"function": {"_name": "now"}}, schema)
    for bad in (
        {"function": {"_name": "get_weather"}},  # a required argument missing
        {"function": {"_name": "now", "city": "Oslo"}},  # an argument it does not take
        {"function": {"_name": "other"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    no_tool = {"function": {"_name": NO_TOOL, "content": "Hello"}}
    if choice == "auto":
        jsonschema.validate(no_tool, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(no_tool, schema)


def test_tools_go_to_the_template_or_after_the_last_message():
    tools = parse_tools([WEATHER], "auto", "Call one.")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "Weather?"}]
    same, variables = with_tools(messages, tools, template_uses_tools=True)
    assert same == messages and variables["tools"][0]["function"]["name"] == "get_weather"
    appended, variables = with_tools(messages, tools, template_uses_tools=False)
    assert variables == {} and appended[0] == messages[0] and messages[1]["content"] == "Weather?"
    question, separator, listed, prompt = appended[1]["content"].split("\n")
    assert question == "Weather?" and separator == "---"
    assert json.loads(listed)[0]["function"]["name"] == "get_weather"
    assert prompt == "Call one."


ANSWERS = [
    ('{"function": {"_name": "get_weather", "city": "Oslo", "unit": "c"}}', "get_weather",
     {"city": "Oslo", "unit": "c"}),
    ('{"function": {"_name": "now"}}', "now", {}),
    ('{"function": {"_name": "get_weather", "city": "a}}b"}}', "get_weather", {"city": "a}}b"}),
]  # fmt: skip


@pytest.mark.parametrize("text, name, arguments", ANSWERS)
def test_whole_answers_become_calls(text, name, arguments):
    call = parse_answer(text)
    assert isinstance(call, ToolCall) and call.id.startswith("call_")
    assert call.name == name and json.loads(call.arguments) == arguments


def test_no_tool_and_cut_answers():
    assert parse_answer('{"function": {"_name": "no_tool", "content": "Hi \\"you\\""}}') == (
        'Hi "you"'
    )
    assert parse_answer('{"function": {"_name": "get_weather", "ci') is None


def accumulate(deltas: list[dict]) -> dict:
    """What openai's stream accumulator makes of tool_calls deltas: strings concatenated,
    index and type kept."""
    call: dict = {"function": {}}
    for delta in deltas:
        assert delta["index"] == 0
        for key in ("id", "type"):
            if key in delta:
                assert key not in call, f"{key} sent twice"
                call[key] = delta[key]
        for key, value in delta.get("function", {}).items():
            call["function"][key] = call["function"].get(key, "") + value
    return call


@pytest.mark.parametrize("text, name, arguments", ANSWERS)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_streamed_answers_accumulate_into_the_call(text, name, arguments, size):
    stream = ToolCallStream()
    deltas = []
    for start in range(0, len(text), size):
        deltas += stream.feed(text[start : start + size])
    rest, content = stream.finish()
    deltas += rest
    assert content is None
    call = accumulate(deltas)
    assert call["id"] == stream.id and call["type"] == "function"
    assert call["function"]["name"] == name
    assert json.loads(call["function"]["arguments"]) == arguments


def test_streamed_no_tool_and_cut_answers_become_content():
    stream = ToolCallStream()
    assert stream.feed('{"function": {"_name": "no_tool", "content": "Hi"}}') == []
    assert stream.finish() == ([], "Hi")
    cut = ToolCallStream()
    assert cut.feed('{"function": {"_na') == []
    assert cut.finish() == ([], '{"function": {"_na')
