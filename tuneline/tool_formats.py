"""How each template writes tools: the tool list in the system prompt, and a function-call turn.

LLaMA-Factory gives every template a tool format (src/llamafactory/data/tool_utils.py): `default`
("Action: / Action Input:"), `qwen` (<tools> and <tool_call> tags), `llama3` (JSON with a date line),
`glm4` and `mistral` ([AVAILABLE_TOOLS], [TOOL_CALLS]). A dataset's `tools` column (a JSON list of
function schemas) becomes `format_tools(tools)`, appended to the system text; an assistant turn with
role `function` (JSON `{"name", "arguments"}`, or a list of them) becomes `format_calls(content)`.
The texts below are what LLaMA-Factory renders, so tool datasets train on the same tokens.

One deliberate difference: LLaMA-Factory's llama3 prompt says "Today Date:" followed by the day it
runs, so the same data tokenizes differently from one day to the next. Tuneline writes a fixed date
(LLAMA3_DATE, the default of Meta's own Llama 3.1 chat template) to keep reruns byte-identical.
"""

from __future__ import annotations

import json
import re

from .errors import TunelineError

LLAMA3_DATE = "26 Jul 2024"
# LLaMA-Factory's FunctionFormatter looks for a thought with these words before the call
_THOUGHT = re.compile(r"<think>\n(.*?)\n</think>\n\n", re.DOTALL)


def _json(value, indent=None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _bare(tool: dict) -> dict:
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _default_tools(tools: list[dict]) -> str:
    text, names = "", []
    for tool in map(_bare, tools):
        params = tool.get("parameters", {})
        args = ""
        for name, param in params.get("properties", {}).items():
            required = ", required" if name in params.get("required", []) else ""
            enum = f", should be one of [{', '.join(param['enum'])}]" if param.get("enum") else ""
            items = f", where each item should be {param['items'].get('type', '')}" if param.get("items") else ""
            args += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{args}\n"
        names.append(tool["name"])
    return ("You have access to the following tools:\n" + text + "Use the following format if using a tool:\n```\n"
            f"Action: tool name (one of [{', '.join(names)}])\n"
            "Action Input: the input to the tool, in a JSON format representing the kwargs "
            '(e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')


def _qwen_tools(tools: list[dict]) -> str:
    listed = "".join("\n" + _json(_wrapped(t)) for t in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            "<args-json-object>}\n</tool_call>")


def _llama3_tools(tools: list[dict]) -> str:
    listed = "".join(_json(_wrapped(t), indent=4) + "\n\n" for t in tools)
    return (f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\n"
            "You have access to the following functions. To call a function, please respond with JSON for a function "
            'call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            "value}. Do not use variables.\n\n" + listed)


def _glm4_tools(tools: list[dict]) -> str:
    listed = "".join(f"\n\n## {t['name']}\n\n{_json(t, indent=4)}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
                     for t in map(_bare, tools))
    return ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
            "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具" + listed)


def _mistral_tools(tools: list[dict]) -> str:
    return "[AVAILABLE_TOOLS] " + _json([_wrapped(t) for t in tools]) + "[/AVAILABLE_TOOLS]"


def _glm4_calls(calls):
    if len(calls) > 1:
        raise TunelineError("template glm4 writes one function call per turn; this turn has "
                            f"{len(calls)} (parallel calls need another template, e.g. qwen)")
    return f"{calls[0][0]}\n{_json(calls[0][1])}"


def _llama3_calls(calls):
    objects = [{"name": name, "parameters": args} for name, args in calls]
    return _json(objects[0] if len(objects) == 1 else objects)


FORMATS = {
    "default": (_default_tools, lambda calls: "\n".join(f"Action: {n}\nAction Input: {_json(a)}" for n, a in calls)),
    "qwen": (_qwen_tools, lambda calls: "\n".join(f"<tool_call>\n{_json({'name': n, 'arguments': a})}\n</tool_call>"
                                                  for n, a in calls)),
    "llama3": (_llama3_tools, _llama3_calls),
    "glm4": (_glm4_tools, _glm4_calls),
    "mistral": (_mistral_tools, lambda calls: _json([{"name": n, "arguments": a} for n, a in calls])),
}


def format_tools(fmt: str, tools: str) -> str:
    """The system-prompt text for `tools`, a JSON list of function schemas ("" for an empty list)."""
    try:
        listed = json.loads(tools)
    except json.JSONDecodeError as e:
        raise TunelineError(f"a `tools` value is not JSON ({e}): {tools[:200]!r}") from None
    listed = [listed] if isinstance(listed, dict) else listed
    return FORMATS[fmt][0](listed) if listed else ""


def format_calls(fmt: str, content: str) -> str:
    """A function-call turn: `content` is JSON {"name", "arguments"} or a list of them, optionally after a thought."""
    thought = _THOUGHT.search(content)
    if thought:
        content = content.replace(thought.group(0), "")
    try:
        calls = json.loads(content)
        calls = [calls] if not isinstance(calls, list) else calls
        pairs = [(c["name"], c["arguments"]) for c in calls]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise TunelineError('a function-call message must be JSON {"name": ..., "arguments": {...}} (or a list of '
                            f"them); got {content[:200]!r}") from None
    return (thought.group(0) if thought else "") + FORMATS[fmt][1](pairs)
