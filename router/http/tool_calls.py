"""Tool calling on /v1/chat/completions: TGI's grammar approach (`router/src/infer/tool_grammar.rs`)
with OpenAI's answer shape.

- `tools` and `tool_choice` ("auto" by default, "none", "required", a function's name, or
  `{"type": "function", "function": {"name"}}`) give the functions the model may call.
- The answer is constrained to `{"function": {"_name": <a function's name>, <its arguments>}}`
  by a JSON-schema grammar; with "auto" one more choice, TGI's `no_tool`, holds a plain answer
  in `content`.
- The tools reach the prompt through the chat template when it uses `tools`; otherwise, as TGI
  does, after a `---` line at the end of the last message, with a request's `tool_prompt`.
- The answer becomes `message.tool_calls` (`arguments` a JSON string) and finish_reason
  "tool_calls" (TGI says "stop"; the OpenAI clients expect this). Streamed, the first chunk
  carries the call's index, id, type and name, the next ones pieces of its arguments: the
  openai and huggingface_hub clients concatenate every string field but index and type.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from router.errors import ToolError
from router.validation.generate_request import Grammar

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "Answer by calling one of the functions above: reply with a single JSON object that "
    "names the function and gives its arguments."
)
NAME_KEY = "_name"  # the grammar's key for the function's name, as TGI's
PREFIX = '{"function": {"' + NAME_KEY + '": "'  # how every constrained answer starts


@dataclass(frozen=True)
class Tools:
    functions: tuple[dict, ...]  # {"name", "description"?, "parameters"?} the model may call
    choice: str  # "auto", "required", or the one function's name
    prompt: str  # what follows the tools when the template has no place for them


def parse_tools(tools: list | None, tool_choice: Any, tool_prompt: str | None) -> Tools | None:
    """The functions a request may call, or None (no tools, or tool_choice "none")."""
    if not tools or tool_choice == "none":
        return None
    functions = tuple(_function(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    choice = _choice(tool_choice)
    if choice not in ("auto", "required"):
        named = [f for f in functions if f["name"] == choice]
        if not named:
            raise ToolError(f"Tool with name {choice} not found")
        functions = tuple(named)
    return Tools(functions, choice, DEFAULT_TOOL_PROMPT if tool_prompt is None else tool_prompt)


def _function(tool: Any, path: str) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type", "function") != "function":
        raise ToolError(f'{path} must be {{"type": "function", "function": {{"name": ...}}}}')
    name = function.get("name")
    if not isinstance(name, str) or not name or name == NO_TOOL:
        raise ToolError(f"{path}.function.name must be a function's name other than {NO_TOOL}")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or not isinstance(parameters.get("properties", {}), dict):
        raise ToolError(f"{path}.function.parameters must be a JSON schema of an object")
    return {"name": name, "description": function.get("description"), "parameters": parameters}


def _choice(tool_choice: Any) -> str:
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str):
        return tool_choice  # "auto", "required", or a name (TGI accepts a bare name)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise ToolError(
        'tool_choice must be "auto", "none", "required" or '
        '{"type": "function", "function": {"name": ...}}'
    )


def tool_grammar(tools: Tools) -> Grammar:
    """The JSON schema every answer follows: one call of one of the functions."""
    variants = [_call_schema(f["name"], f["parameters"]) for f in tools.functions]
    if tools.choice == "auto":
        content = {"type": "string", "description": "The answer, when no function helps"}
        no_tool = {"type": "object", "properties": {"content": content}, "required": ["content"]}
        variants.append(_call_schema(NO_TOOL, no_tool))
    schema = {
        "type": "object",
        "properties": {"function": {"anyOf": variants}},
        "required": ["function"],
        "additionalProperties": False,
    }
    return Grammar("json", schema)


def _call_schema(name: str, parameters: dict) -> dict:
    """`parameters`' object with the function's name first (so the name streams first) and no
    arguments it does not declare."""
    properties = {NAME_KEY: {"const": name}, **parameters.get("properties", {})}
    required = [NAME_KEY, *parameters.get("required", [])]
    extra = {k: v for k, v in parameters.items() if k not in ("properties", "required", "type")}
    return {
        **extra,
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def with_tools(
    messages: list[dict], tools: Tools, template_uses_tools: bool
) -> tuple[list[dict], dict]:
    """The messages and template variables that put the tools in the prompt."""
    listed = [{"type": "function", "function": f} for f in tools.functions]
    if template_uses_tools:
        return messages, {"tools": listed}
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n---\n{json.dumps(listed)}\n{tools.prompt}"
    return [*messages[:-1], last], {}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def parse_answer(text: str) -> ToolCall | str | None:
    """A whole constrained answer: the call, the `no_tool` content, or None where the text is
    not a whole call (cut by max_tokens)."""
    try:
        call = json.loads(text)["function"]
        name = call.pop(NAME_KEY)
    except (ValueError, KeyError, TypeError):
        return None
    if name == NO_TOOL:
        return str(call.get("content", ""))
    return ToolCall(new_call_id(), name, json.dumps(call, ensure_ascii=False))


class ToolCallStream:
    """Turns the streamed text of a constrained answer into OpenAI `delta.tool_calls`: nothing
    until the name is known, then one delta with id, type and name, then the arguments as they
    come, held back by one character, since the answer's last `}` closes the outer object and
    is no part of them. A `no_tool` answer is held whole and given as content at the end."""

    def __init__(self):
        self.text = ""  # everything generated so far
        self.name: str | None = None
        self.sent = 0  # characters of the arguments already sent
        self.id = new_call_id()

    def feed(self, piece: str) -> list[dict]:
        """The tool_calls deltas a piece of generated text releases."""
        self.text += piece
        out = []
        if self.name is None:
            self.name = self._name()
            if self.name is None or self.name == NO_TOOL:
                return []
            function = {"name": self.name, "arguments": ""}
            out.append({"index": 0, "id": self.id, "type": "function", "function": function})
        if self.name != NO_TOOL:
            arguments = self._arguments()[:-1]  # the last character may be the outer "}"
            if len(arguments) > self.sent:
                piece = arguments[self.sent :]
                if out:  # the same delta as the name: one entry per call and chunk
                    out[0]["function"]["arguments"] = piece
                else:
                    out.append(_arguments_delta(piece))
                self.sent = len(arguments)
        return out

    def finish(self) -> tuple[list[dict], str | None]:
        """At the end: the remaining argument deltas, or the content of a `no_tool` answer (or
        of an answer cut before its name was known)."""
        if self.name is None or self.name == NO_TOOL:
            answer = parse_answer(self.text)
            return [], answer if isinstance(answer, str) else self.text
        arguments = self._arguments()
        if self.text.endswith("}}"):  # whole: drop the outer object's "}"
            arguments = arguments[:-1]
        rest = arguments[self.sent :]
        self.sent = len(arguments)
        return ([_arguments_delta(rest)] if rest else []), None

    def _name(self) -> str | None:
        if not self.text.startswith(PREFIX):
            return None
        end = self.text.find('"', len(PREFIX))  # names have no quotes (they are identifiers)
        return None if end < 0 else self.text[len(PREFIX) : end]

    def _arguments(self) -> str:
        """The arguments so far: `{` and what follows the name's `, ` (or `}` when none)."""
        rest = self.text[len(PREFIX) + len(self.name) + 1 :]
        return "{" + (rest[2:] if rest.startswith(", ") else rest)


def _arguments_delta(text: str) -> dict:
    return {"index": 0, "function": {"arguments": text}}
