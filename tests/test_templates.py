"""Templates render LLaMA-Factory's formats, and the same object serves training and inference."""

import json

import pytest
import yaml

from tuneline.config import SCHEMA_PATH
from tuneline.errors import TunelineError
from tuneline.templates import ChatTemplateRenderer, available, from_description, get_template

TWO_TURNS = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
             {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


def test_qwen_worked_example(tokenizer):
    # LLaMA-Factory's reference: qwen with a system prompt and two turns
    turns = get_template("qwen", tokenizer).render_turns(TWO_TURNS, system="S")
    assert turns == [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>\n"),
        ("<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "A2<|im_end|>\n"),
    ]


@pytest.mark.parametrize("name, first_source, first_target", [
    ("default", "System: S<|im_end|>\nHuman: Q1<|im_end|>\nAssistant:", "A1<|im_end|>\n"),
    ("alpaca", "S### Instruction:\nQ1\n\n### Response:\n", "A1<|im_end|>\n\n"),
    ("llama3", "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
     "A1<|eot_id|>"),
    ("chatml", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "A1<|im_end|>\n"),
    ("empty", "SQ1", "A1"),
])
def test_named_template_slots(tokenizer, name, first_source, first_target):
    # the tiny tokenizer's bos is <|im_start|> and eos is <|im_end|>
    assert get_template(name, tokenizer).render_turns(TWO_TURNS, system="S")[0] == (first_source, first_target)


def test_default_system_is_used_without_one(tokenizer):
    source, _ = get_template("alpaca", tokenizer).render_turns(TWO_TURNS[:2])[0]
    assert source.startswith("Below is an instruction that describes a task.")
    source, _ = get_template("alpaca", tokenizer, default_system="Be brief.").render_turns(TWO_TURNS[:2])[0]
    assert source.startswith("Be brief.### Instruction")


def test_tokenizer_chat_template_is_split_at_turn_boundaries(tokenizer):
    template = get_template(None, tokenizer)
    assert isinstance(template, ChatTemplateRenderer)
    turns = template.render_turns(TWO_TURNS)
    assert "".join(s + t for s, t in turns) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert [t for _, t in turns] == ["A1<|im_end|>\n", "A2<|im_end|>\n"]
    # the inference prompt is the chat template's own generation prompt
    prompt = template.encode_prompt(TWO_TURNS[:3])
    assert prompt == tokenizer.encode(tokenizer.apply_chat_template(TWO_TURNS[:3], tokenize=False,
                                                                    add_generation_prompt=True), add_special_tokens=False)


@pytest.mark.parametrize("name", ["default", "alpaca", "chatml", "qwen", "llama3", "smollm2", "vicuna", "empty"])
def test_saved_jinja_renders_like_the_template(tiny_model, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)  # its own copy: the chat_template is replaced
    template = get_template(name, tokenizer)
    tokenizer.chat_template = template.to_jinja()
    for system in ("", "S"):
        messages = ([{"role": "system", "content": system}] if system else []) + TWO_TURNS
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert rendered == "".join(s + t for s, t in template.render_turns(TWO_TURNS, system=system))


def test_template_round_trips_through_its_description(tokenizer):
    for name in (None, "llama3"):
        template = get_template(name, tokenizer)
        again = from_description(template.describe(), tokenizer)
        assert again.render_turns(TWO_TURNS, "S") == template.render_turns(TWO_TURNS, "S")


def test_stop_words_become_stop_ids(tokenizer):
    ids = get_template("chatml", tokenizer).stop_token_ids()
    assert ids == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")]


def test_unknown_template_lists_the_known_ones(tokenizer):
    with pytest.raises(TunelineError, match="unknown template 'nope'.*alpaca, chatml"):
        get_template("nope", tokenizer)


def test_schema_allows_exactly_the_known_templates():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    assert sorted(v for v in schema["properties"]["template"]["enum"] if v) == available()


def test_a_template_whose_special_tokens_the_tokenizer_lacks_is_warned_about(tokenizer, caplog):
    import logging

    from tuneline.templates import get_template

    log = logging.getLogger("test")
    with caplog.at_level(logging.WARNING, logger="test"):
        get_template("chatml", tokenizer, None, log)
        assert "not a token" not in caplog.text  # <|im_start|>/<|im_end|> are the tiny tokenizer's own
        get_template("llama3", tokenizer, None, log)
    assert "template llama3: <|start_header_id|>, <|end_header_id|>, <|eot_id|> are not tokens of this tokenizer" in caplog.text


# LLaMA-Factory's register_template definitions (src/llamafactory/data/template.py), written out for a system
# prompt and two turns. {B} and {E} stand for the tokenizer's bos and eos (the tiny tokenizer's are <|im_start|>
# and <|im_end|>). Llama2Template templates (llama2, mistral, gemma*) put the system block inside the first
# user slot; ReasoningTemplate qwen3 prepends an empty thought to a response that has none.
_QWEN = ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n{t}A1<|im_end|>\n"
         "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n{t}A2<|im_end|>\n")
_GEMMA = ("{B}<start_of_turn>user\nS\n\nQ1<end_of_turn>\n<start_of_turn>model\nA1<end_of_turn>\n"
          "<start_of_turn>user\nQ2<end_of_turn>\n<start_of_turn>model\nA2<end_of_turn>\n")
LLAMAFACTORY_RENDERINGS = {
    "qwen3": (_QWEN.format(t="<think>\n\n</think>\n\n"), ["<|im_end|>"]),
    "qwen3_nothink": (_QWEN.format(t=""), ["<|im_end|>"]),
    "yi": (_QWEN.format(t=""), ["<|im_end|>"]),
    "llama2": ("{B}[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST]A1{E}{B}[INST] Q2 [/INST]A2{E}", []),
    "mistral": ("{B}[INST] S\n\nQ1[/INST] A1{E}[INST] Q2[/INST] A2{E}", []),
    "gemma": (_GEMMA, ["<end_of_turn>"]),
    "gemma3": (_GEMMA, ["<end_of_turn>"]),
    "phi4": ("<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q1<|im_end|><|im_start|>assistant"
             "<|im_sep|>A1<|im_end|><|im_start|>user<|im_sep|>Q2<|im_end|><|im_start|>assistant<|im_sep|>A2<|im_end|>",
             ["<|im_end|>"]),
    "deepseek3": ("{B}S<｜User｜>Q1<｜Assistant｜>A1{E}<｜User｜>Q2<｜Assistant｜>A2{E}", []),
    "glm4": ("[gMASK]<sop><|system|>\nS<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\nA2",
             ["<|user|>", "<|observation|>"]),
    "llama3": ("{B}<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ1"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nQ2<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>",
               ["<|eot_id|>", "<|eom_id|>"]),
    "vicuna": ("SUSER: Q1 ASSISTANT:A1{E}USER: Q2 ASSISTANT:A2{E}", []),
}


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_RENDERINGS))
def test_templates_render_what_llamafactory_renders(tokenizer, name):
    expected, stops = LLAMAFACTORY_RENDERINGS[name]
    expected = expected.replace("{B}", tokenizer.bos_token).replace("{E}", tokenizer.eos_token)
    template = get_template(name, tokenizer)
    assert "".join(s + t for s, t in template.render_turns(TWO_TURNS, system="S")) == expected
    assert list(template.stop_words) == stops


def test_the_templates_of_todays_popular_models_are_known():
    wanted = {"qwen3", "qwen3_nothink", "qwen", "llama3", "llama2", "mistral", "gemma", "gemma3", "phi4", "deepseek3",
              "glm4", "yi", "chatml", "alpaca", "vicuna", "default", "empty"}
    assert wanted <= set(available())


@pytest.mark.parametrize("name", ["llama2", "mistral", "gemma", "qwen3", "glm4", "phi4"])
def test_saved_jinja_of_llamafactory_templates_renders_like_the_template(tiny_model, name):
    test_saved_jinja_renders_like_the_template(tiny_model, name)


# Tools: a tool list in the system prompt, a function call, its observation and the answer. The expected texts are
# LLaMA-Factory's tool formats (src/llamafactory/data/tool_utils.py) and function slots (template.py), written out.
TOOL = {"name": "f", "description": "D",
        "parameters": {"type": "object", "properties": {"x": {"type": "integer", "description": "X"}}, "required": ["x"]}}
TOOL_CHAT = [{"role": "user", "content": "Q1"}, {"role": "function", "content": '{"name": "f", "arguments": {"x": 1}}'},
             {"role": "observation", "content": '{"y": 2}'}, {"role": "assistant", "content": "A1"}]
_WRAPPED = json.dumps({"type": "function", "function": TOOL})
_DEFAULT_TOOLS = ("You have access to the following tools:\n> Tool Name: f\nTool Description: D\nTool Args:\n"
                  "  - x (integer, required): X\n\nUse the following format if using a tool:\n```\n"
                  "Action: tool name (one of [f])\nAction Input: the input to the tool, in a JSON format representing "
                  'the kwargs (e.g. ```{"input": "hello world", "num_beams": 5}```)\n```\n')
_QWEN_TOOLS = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
               f"with function signatures within <tools></tools> XML tags:\n<tools>\n{_WRAPPED}\n</tools>\n\n"
               "For each function call, return a json object with function name and arguments within <tool_call>"
               '</tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
               "</tool_call>")
_QWEN_TOOL_CHAT = ("<|im_start|>system\nS" + _QWEN_TOOLS + "<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                   '<|im_start|>assistant\n{t}<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
                   '<|im_end|>\n<|im_start|>user\n<tool_response>\n{"y": 2}\n</tool_response><|im_end|>\n'
                   "<|im_start|>assistant\n{t}A1<|im_end|>\n")
LLAMAFACTORY_TOOL_RENDERINGS = {
    "chatml": ("<|im_start|>system\nS" + _DEFAULT_TOOLS + "<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
               '<|im_start|>assistant\nAction: f\nAction Input: {"x": 1}<|im_end|>\n<|im_start|>tool\n{"y": 2}'
               "<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"),
    "qwen": _QWEN_TOOL_CHAT.replace("{t}", ""),
    "qwen3": _QWEN_TOOL_CHAT.replace("{t}", "<think>\n\n</think>\n\n"),
    "llama3": ("{B}<|start_header_id|>system<|end_header_id|>\n\nSCutting Knowledge Date: December 2023\n"
               "Today Date: 26 Jul 2024\n\nYou have access to the following functions. To call a function, please "
               'respond with JSON for a function call. Respond in the format {"name": function name, "parameters": '
               "dictionary of argument name and its value}. Do not use variables.\n\n"
               + json.dumps({"type": "function", "function": TOOL}, indent=4) + "\n\n<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
               '\n\n{"name": "f", "parameters": {"x": 1}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
               '{"y": 2}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>'),
    "glm4": ("[gMASK]<sop><|system|>\nS你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
             "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具\n\n## f\n\n" + json.dumps(TOOL, indent=4)
             + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。<|user|>\nQ1<|assistant|>"
             'f\n{"x": 1}<|observation|>\n{"y": 2}<|assistant|>\nA1'),
    "mistral": ("{B}[INST] S[AVAILABLE_TOOLS] [" + _WRAPPED + "][/AVAILABLE_TOOLS]\n\nQ1[/INST]"
                '[TOOL_CALLS] [{"name": "f", "arguments": {"x": 1}}]{E}[TOOL_RESULTS] {"content": {"y": 2}}'
                "[/TOOL_RESULTS] A1{E}"),
}


@pytest.mark.parametrize("name", sorted(LLAMAFACTORY_TOOL_RENDERINGS))
def test_tools_and_function_calls_render_what_llamafactory_renders(tokenizer, name):
    expected = LLAMAFACTORY_TOOL_RENDERINGS[name].replace("{B}", tokenizer.bos_token).replace("{E}", tokenizer.eos_token)
    turns = get_template(name, tokenizer).render_turns(TOOL_CHAT, system="S", tools=json.dumps([TOOL]))
    assert "".join(s + t for s, t in turns) == expected
    assert len(turns) == 2  # the call is a response (trained on), the observation a prompt (masked)


def test_the_tokenizers_own_template_writes_tools_in_the_default_format(tokenizer):
    turns = get_template(None, tokenizer).render_turns(TOOL_CHAT, system="S", tools=json.dumps([TOOL]))
    assert turns[0][0].startswith("<|im_start|>system\nS" + _DEFAULT_TOOLS + "<|im_end|>")
    assert turns[0][1] == 'Action: f\nAction Input: {"x": 1}<|im_end|>\n'


def test_a_function_call_that_is_not_a_call_is_refused(tokenizer):
    chat = [TOOL_CHAT[0], {"role": "function", "content": "call f please"}]
    with pytest.raises(TunelineError, match="function-call message must be JSON"):
        get_template("qwen", tokenizer).render_turns(chat, tools=json.dumps([TOOL]))
    two_calls = json.dumps([{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}])
    with pytest.raises(TunelineError, match="glm4 writes one function call per turn"):
        get_template("glm4", tokenizer).render_turns([TOOL_CHAT[0], {"role": "function", "content": two_calls}])
    # qwen writes parallel calls, one <tool_call> block each
    _, reply = get_template("qwen", tokenizer).render_turns([TOOL_CHAT[0], {"role": "function", "content": two_calls}])[0]
    assert reply.count("<tool_call>") == 2


def test_llamafactorys_glaive_demo_tokenizes_with_its_tools(tmp_path, tiny_model):
    """Every record of glaive_toolcall_en_demo renders with qwen's tool format: tool list in the system turn,
    calls as <tool_call> responses."""
    import logging

    from conftest import LF_DATA
    from tuneline import records
    from tuneline.registry import selected_entries

    kept, _ = records.collect(selected_entries(str(LF_DATA), "glaive_toolcall_en_demo"), logging.getLogger("t"),
                              dataset_dir=str(LF_DATA), stage="sft", max_samples=None, identity_name="T",
                              identity_author="T")
    from transformers import AutoTokenizer

    template = get_template("qwen", AutoTokenizer.from_pretrained(tiny_model))
    calls = 0
    for record in kept:
        turns = template.render_turns(record["messages"], record.get("system") or "", record.get("tools") or "")
        assert ("# Tools" in turns[0][0]) == bool(json.loads(record.get("tools") or "[]"))  # "[]": no tool text
        calls += sum(t.startswith("<tool_call>\n{") for _, t in turns)
    assert len(kept) > 250 and calls > 100
