"""Templates render LLaMA-Factory's formats, and the same object serves training and inference."""

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
