"""Tool calling on the default model through the real clients, unmodified: the `openai`
package (sync and async, streamed, and its stream helper that accumulates the deltas) and
huggingface_hub's chat_completion; tool_choice required, named and auto; a conversation that
carries the call and the tool's result back."""

from __future__ import annotations

import asyncio
import json

import pytest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
        },
    },
}
TOOLS = [WEATHER, CLOCK]
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_time"}}


def clients(launcher):
    import openai

    url = f"{launcher.url}/v1"
    return (
        openai.OpenAI(base_url=url, api_key="unused", max_retries=0),
        openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0),
    )


def check_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)  # a JSON string, as OpenAI's
    required = {"get_weather": {"city", "unit"}, "get_time": {"timezone"}}[call.function.name]
    assert set(arguments) == required
    return arguments


@pytest.mark.parametrize("choice", ["required", "auto", NAMED])
def test_openai_tool_calls(launcher, choice):
    client, _ = clients(launcher)
    out = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=TOOLS, tool_choice=choice, max_tokens=80,
        temperature=0,
    )  # fmt: skip
    choice_out = out.choices[0]
    if choice == "auto" and choice_out.message.tool_calls is None:  # the model may answer
        assert choice_out.message.content and choice_out.finish_reason == "stop"
        return
    assert choice_out.finish_reason == "tool_calls" and choice_out.message.content is None
    (call,) = choice_out.message.tool_calls
    check_call(call, ("get_time",) if choice == NAMED else ("get_weather", "get_time"))


def test_openai_streamed_calls_accumulate(launcher):
    client, async_client = clients(launcher)
    kwargs = dict(model="tgi", messages=QUESTION, tools=TOOLS, tool_choice="required",
                  max_tokens=80, temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    with client.beta.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    (streamed,) = final.message.tool_calls
    assert check_call(streamed) == check_call(whole)  # the same call, in pieces

    async def chunks():
        stream = await async_client.chat.completions.create(**kwargs, stream=True)
        return [chunk async for chunk in stream]

    received = asyncio.run(chunks())
    deltas = [d for c in received for d in (c.choices[0].delta.tool_calls or [])]
    assert sum(d.id is not None for d in deltas) == 1  # id and name once, then arguments
    assert sum(d.function.name is not None for d in deltas) == 1
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert received[-1].choices[0].finish_reason == "tool_calls"


def test_huggingface_hub_tool_calls(launcher):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=launcher.url)
    out = client.chat_completion(
        QUESTION, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    (call,) = out.choices[0].message.tool_calls
    check_call(call)
    chunks = list(
        client.chat_completion(
            QUESTION,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=80,
            temperature=0,
            stream=True,
        )  # fmt: skip
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == call.function.name
    arguments = "".join(d.function.arguments for d in deltas)
    assert json.loads(arguments) == json.loads(call.function.arguments)


def test_the_call_and_its_result_go_back_to_the_model(launcher):
    client, _ = clients(launcher)
    first = client.chat.completions.create(
        model="tgi", messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=80,
        temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 21})},
    ]
    answer = client.chat.completions.create(
        model="tgi", messages=history, max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content


def test_tool_errors_are_422(launcher):
    import openai

    client, _ = clients(launcher)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(
            model="tgi", messages=QUESTION, tools=TOOLS, max_tokens=8,
            tool_choice={"type": "function", "function": {"name": "missing"}},
        )  # fmt: skip
    body = info.value.response.json()
    assert body["error_type"] == "tool_error"
    assert body["error"] == "Tool error: Tool with name missing not found"
