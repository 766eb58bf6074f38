"""Prompt templates: the one object that renders conversations for training and for inference.

Named templates use LLaMA-Factory's slots (`{{content}}`, `<bos>`, `<eos>`); with no name, the
tokenizer's own `chat_template` is used, split into (prompt, response) pieces by rendering
growing prefixes of the conversation. Both encode a conversation as a list of
(source_ids, target_ids) pairs, one per turn: the source is the prompt side (masked in
training), the target is the response including the template's end-of-turn suffix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import TunelineError
from .tool_formats import LLAMA3_DATE, format_calls, format_tools

ROLES_PROMPT = ("user", "observation")


@dataclass(frozen=True)
class SlotTemplate:
    name: str
    user: str = "{{content}}"
    assistant: str = "{{content}}<eos>"
    system: str = "{{content}}"
    observation: str | None = None  # None: like user
    prefix: str = ""
    default_system: str = ""
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False
    # LLaMA-Factory's Llama2Template: the system block goes inside the first user slot, not before it
    system_in_user: bool = False
    # LLaMA-Factory's ReasoningTemplate (enable_thinking): a response without a thought gets an empty one
    thought_words: tuple[str, str] | None = None
    # LLaMA-Factory's format_tools / format_function: how tools and function-call turns are written
    # (tuneline/tool_formats.py); `function` is the slot around a call, None: the assistant slot
    tool_format: str = "default"
    function: str | None = None
    extra: dict = field(default_factory=dict)


_IM = dict(system="<|im_start|>system\n{{content}}<|im_end|>\n",
           user="<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
           assistant="{{content}}<|im_end|>\n")

_QWEN_TOOL = "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"

# Slots as LLaMA-Factory's register_template defines them (src/llamafactory/data/template.py): `<bos>`/`<eos>`
# are the tokenizer's tokens; an unset assistant slot is "{{content}}<eos>", an unset system slot "{{content}}".
SLOT_TEMPLATES = {t.name: t for t in [
    SlotTemplate("default", system="System: {{content}}<eos>\n", user="Human: {{content}}<eos>\nAssistant:",
                 assistant="{{content}}<eos>\n"),
    SlotTemplate("alpaca", user="### Instruction:\n{{content}}\n\n### Response:\n", assistant="{{content}}<eos>\n\n",
                 default_system="Below is an instruction that describes a task. Write a response that "
                                "appropriately completes the request.\n\n"),
    SlotTemplate("chatml", **_IM, observation="<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
                 stop_words=("<|im_end|>", "<|im_start|>")),
    SlotTemplate("qwen", **_IM, observation=_QWEN_TOOL, tool_format="qwen",
                 default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                 stop_words=("<|im_end|>",)),
    SlotTemplate("smollm2", **_IM, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
                 stop_words=("<|im_end|>",)),
    SlotTemplate("llama3", prefix="<bos>",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
                      "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 assistant="{{content}}<|eot_id|>",
                 observation="<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n",
                 stop_words=("<|eot_id|>", "<|eom_id|>"), tool_format="llama3"),
    SlotTemplate("qwen3", **_IM, observation=_QWEN_TOOL, stop_words=("<|im_end|>",), thought_words=("<think>", "</think>"),
                 tool_format="qwen"),
    SlotTemplate("qwen3_nothink", **_IM, observation=_QWEN_TOOL, stop_words=("<|im_end|>",), tool_format="qwen"),
    SlotTemplate("yi", **_IM, stop_words=("<|im_end|>",)),
    SlotTemplate("llama2", user="<bos>[INST] {{content}} [/INST]", system="<<SYS>>\n{{content}}\n<</SYS>>\n\n",
                 system_in_user=True),
    SlotTemplate("mistral", prefix="<bos>", user="[INST] {{content}}[/INST]", assistant=" {{content}}<eos>",
                 system="{{content}}\n\n", observation='[TOOL_RESULTS] {"content": {{content}}}[/TOOL_RESULTS]',
                 system_in_user=True, tool_format="mistral", function="[TOOL_CALLS] {{content}}<eos>"),
    *[SlotTemplate(name, prefix="<bos>", user="<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
                   assistant="{{content}}<end_of_turn>\n", system="{{content}}\n\n",
                   observation="<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
                   stop_words=("<end_of_turn>",), system_in_user=True) for name in ("gemma", "gemma3")],
    SlotTemplate("phi4", user="<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",
                 assistant="{{content}}<|im_end|>", system="<|im_start|>system<|im_sep|>{{content}}<|im_end|>",
                 stop_words=("<|im_end|>",)),
    SlotTemplate("deepseek3", prefix="<bos>", user="<\uff5cUser\uff5c>{{content}}<\uff5cAssistant\uff5c>"),
    SlotTemplate("glm4", prefix="[gMASK]<sop>", user="<|user|>\n{{content}}<|assistant|>", assistant="\n{{content}}",
                 system="<|system|>\n{{content}}", observation="<|observation|>\n{{content}}<|assistant|>",
                 stop_words=("<|user|>", "<|observation|>"), efficient_eos=True, tool_format="glm4", function="{{content}}"),
    SlotTemplate("vicuna", user="USER: {{content}} ASSISTANT:",
                 default_system="A chat between a curious user and an artificial intelligence assistant. The "
                                "assistant gives helpful, detailed, and polite answers to the user's questions."),
    SlotTemplate("empty", assistant="{{content}}"),
    SlotTemplate("fewshot", assistant="{{content}}\n\n", efficient_eos=True),
]}

def available() -> list[str]:
    return sorted(SLOT_TEMPLATES)


class Template:
    """Renders and encodes conversations; built by `get_template`."""

    name: str
    stop_words: tuple[str, ...] = ()
    efficient_eos: bool = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    # --- to implement
    def render_turns(self, messages: list[dict], system: str, tools: str) -> list[tuple[str, str]]:
        raise NotImplementedError

    # --- shared
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_turns(self, messages, system="", tools="") -> list[tuple[list[int], list[int]]]:
        """(source_ids, target_ids) per turn; `messages` alternate prompt/response and end with a response."""
        return [(self._ids(s), self._ids(t)) for s, t in self.render_turns(messages, system, tools)]

    def encode_prompt(self, messages, system="", tools="") -> list[int]:
        """The ids that prompt a reply to `messages`, which end with a user message."""
        turns = self.render_turns(list(messages) + [{"role": "assistant", "content": ""}], system, tools)
        text = "".join(s + t for s, t in turns[:-1]) + turns[-1][0]
        return self._ids(text)

    def stop_token_ids(self) -> list[int]:
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for word in self.stop_words:
            tid = self.tokenizer.convert_tokens_to_ids(word)
            if tid is not None and tid != self.tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
        return ids

    def describe(self) -> dict:
        return {"name": self.name, "stop_words": list(self.stop_words), "efficient_eos": self.efficient_eos}

    def pieces(self) -> dict:
        """The literal text around each message, found by rendering sentinel messages: keys prefix,
        system_pre/post, user_pre/post, assistant_pre/post and default_system. For runtimes that take
        a template of their own (Ollama's Modelfile). Raises TunelineError when turns are not uniform."""
        s, u, a, u2 = "\x01SYSTEM\x01", "\x02USER\x02", "\x03ASSISTANT\x03", "\x04USER\x04"

        def text(messages, system):
            return "".join(x + y for x, y in self.render_turns(messages, system, ""))

        one = text([{"role": "user", "content": u}, {"role": "assistant", "content": a}], s)
        two = text([{"role": "user", "content": u}, {"role": "assistant", "content": a},
                    {"role": "user", "content": u2}, {"role": "assistant", "content": a}], s)
        no_system = text([{"role": "user", "content": u}, {"role": "assistant", "content": a}], "")
        try:
            head, rest = one.split(s)
            system_post_user_pre, rest = rest.split(u)
            user_post, assistant_post = rest.split(a)
            second = two[len(one):]
            user_pre = second[: second.index(u2)]
            if not (two.startswith(one) and second == user_pre + u2 + user_post + a + assistant_post
                    and system_post_user_pre.endswith(user_pre)):
                raise ValueError
        except ValueError:
            raise TunelineError(f"template '{self.name}' does not render every turn alike; it cannot be "
                                "written as a per-message template (Ollama).") from None
        system_post = system_post_user_pre[: len(system_post_user_pre) - len(user_pre)]
        without = no_system.split(u)[0]
        prefix, default_system = "", ""
        if without.endswith(system_post_user_pre) and without.startswith(head) and len(without) > len(
                head + system_post_user_pre):  # a system block even without a system message: its default
            default_system = without[len(head): len(without) - len(system_post_user_pre)]
        elif without.endswith(user_pre) and head.startswith(without[: len(without) - len(user_pre)]):
            prefix = without[: len(without) - len(user_pre)]
        else:
            raise TunelineError(f"template '{self.name}': cannot locate its default system message.")
        return {"prefix": prefix, "system_pre": head[len(prefix):], "system_post": system_post,
                "user_pre": user_pre, "user_post": user_post, "assistant_pre": "", "assistant_post": assistant_post,
                "default_system": default_system}


class SlotRenderer(Template):
    def __init__(self, tokenizer, slots: SlotTemplate, default_system: str | None = None):
        super().__init__(tokenizer)
        self.slots = slots
        self.name = slots.name
        self.stop_words = slots.stop_words
        self.efficient_eos = slots.efficient_eos
        self.default_system = slots.default_system if default_system is None else default_system

    def _fill(self, slot: str, content: str) -> str:
        bos = self.tokenizer.bos_token or ""
        eos = self.tokenizer.eos_token or ""
        return slot.replace("{{content}}", content).replace("<bos>", bos).replace("<eos>", eos)

    def render_turns(self, messages, system="", tools=""):
        # as LLaMA-Factory: the tool text follows the system text directly (its formats begin with their own breaks)
        system_text = (system or self.default_system) + (format_tools(self.slots.tool_format, tools) if tools else "")
        turns = []
        for i in range(0, len(messages), 2):
            prompt, response = messages[i], messages[i + 1]
            source, content = "", prompt["content"]
            if i == 0:
                source = self._fill(self.slots.prefix, "")
                if system_text and self.slots.system_in_user:
                    content = self._fill(self.slots.system, system_text) + content
                elif system_text:
                    source += self._fill(self.slots.system, system_text)
            slot = self.slots.observation if prompt["role"] == "observation" and self.slots.observation else self.slots.user
            source += self._fill(slot, content)
            answer, reply_slot = response["content"], self.slots.assistant
            if response["role"] == "function":
                answer = format_calls(self.slots.tool_format, answer)
                reply_slot = self.slots.function or reply_slot
            thought = self.slots.thought_words
            if thought and answer and thought[0] not in answer and thought[1] not in answer:
                answer = f"{thought[0]}\n\n{thought[1]}\n\n" + answer  # LLaMA-Factory's empty thought
            turns.append((source, self._fill(reply_slot, answer)))
        return turns

    def describe(self):
        return {**super().describe(), "slots": asdict(self.slots), "default_system": self.default_system}

    def to_jinja(self) -> str:
        """A Jinja chat_template that renders exactly like `render_turns` (saved with merged models)."""

        def lit(slot: str, var: str | None = None) -> str:
            text = self._fill(slot, "\x00")
            parts = [repr(p) for p in text.split("\x00")]
            return "{{ " + (f" + {var} + ".join(parts) if var else parts[0]) + " }}"

        obs = self.slots.observation or self.slots.user
        in_user = self.slots.system_in_user
        system_block = lit(self.slots.system, "system")[3:-3]  # the expression inside {{ }}
        first = "((system_block if loop.first else '') + message['content'])" if in_user else "message['content']"
        answer = "message['content']"
        thought = ""
        if self.slots.thought_words:
            open_, close = self.slots.thought_words
            thought = ("{% set answer = message['content'] %}{% if answer and " + repr(open_) + " not in answer and "
                       + repr(close) + " not in answer %}{% set answer = " + repr(f"{open_}\n\n{close}\n\n")
                       + " + answer %}{% endif %}")
            answer = "answer"
        return "".join([
            "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set loop_messages = messages[1:] %}{% else %}",
            "{% set system = " + repr(self.default_system) + " %}{% set loop_messages = messages %}{% endif %}",
            lit(self.slots.prefix),
            ("{% set system_block = (" + system_block + ") if system else '' %}" if in_user else
             "{% if system %}" + lit(self.slots.system, "system") + "{% endif %}"),
            "{% for message in loop_messages %}",
            "{% if message['role'] == 'user' %}", lit(self.slots.user, first),
            "{% elif message['role'] in ('tool', 'observation') %}", lit(obs, first),
            "{% else %}", thought, lit(self.slots.assistant, answer), "{% endif %}",
            "{% endfor %}",
        ])


class ChatTemplateRenderer(Template):
    """The tokenizer's own Jinja chat_template, split into turns by rendering prefixes."""

    name = "tokenizer_chat_template"

    def __init__(self, tokenizer, default_system: str | None = None):
        super().__init__(tokenizer)
        self.default_system = default_system or ""
        eos = tokenizer.eos_token
        self.stop_words = (eos,) if eos else ()

    def _render(self, messages, add_generation_prompt):
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def render_turns(self, messages, system="", tools=""):
        role_map = {"user": "user", "observation": "user", "assistant": "assistant", "function": "assistant"}
        head = []
        # LLaMA-Factory's parse_template: the `default` tool format, calls written as assistant text
        system_text = (system or self.default_system) + (format_tools("default", tools) if tools else "")
        if system_text:
            head = [{"role": "system", "content": system_text}]
        chat = head + [{"role": role_map[m["role"]],
                        "content": format_calls("default", m["content"]) if m["role"] == "function" else m["content"]}
                       for m in messages]
        turns, done = [], ""
        for i in range(len(head), len(chat), 2):
            with_prompt = self._render(chat[: i + 1], True)
            with_reply = self._render(chat[: i + 2], False)
            if not (with_prompt.startswith(done) and with_reply.startswith(with_prompt)):
                raise TunelineError(
                    "the tokenizer's chat_template does not render conversations as growing prefixes, so "
                    "prompt and response cannot be told apart; set `template` to a named template "
                    f"({', '.join(available())})."
                )
            turns.append((with_prompt[len(done):], with_reply[len(with_prompt):]))
            done = with_reply
        return turns

    def describe(self):
        return {**super().describe(), "chat_template": self.tokenizer.chat_template,
                "default_system": self.default_system}


def get_template(name: str | None, tokenizer, default_system: str | None = None, log=None) -> Template:
    """`name` from config key `template`; None means the tokenizer's chat_template (else `empty`)."""
    if name is None:
        if getattr(tokenizer, "chat_template", None):
            return ChatTemplateRenderer(tokenizer, default_system)
        if log:
            log.info("template unset and the tokenizer has no chat_template: using `empty`")
        name = "empty"
    if name not in SLOT_TEMPLATES:
        raise TunelineError(f"unknown template '{name}' (config key `template`); available: {', '.join(available())}, "
                            "or leave it unset to use the tokenizer's own chat_template.")
    missing = foreign_special_tokens(SLOT_TEMPLATES[name], tokenizer)
    if missing and log:
        log.warning("template %s: %s %s of this tokenizer, so the model learns %s as plain-text pieces; "
                    "a template made for this model (or `template` unset: the tokenizer's own chat_template) "
                    "avoids that", name, ", ".join(missing), "is not a token" if len(missing) == 1 else "are not tokens",
                    "it" if len(missing) == 1 else "them")
    if SLOT_TEMPLATES[name].tool_format == "llama3" and log:
        log.info("template llama3: a tool prompt says 'Today Date: %s' on every run (LLaMA-Factory writes the day it "
                 "runs, which would change the tokens from one day to the next)", LLAMA3_DATE)
    return SlotRenderer(tokenizer, SLOT_TEMPLATES[name], default_system)


def foreign_special_tokens(slots: SlotTemplate, tokenizer) -> list[str]:
    """Special-token markers a template writes (`<|...|>`, `<start_of_turn>`-style) that the tokenizer
    does not have as single tokens (`<bos>`/`<eos>` stand for the tokenizer's own)."""
    import re

    text = " ".join([slots.user, slots.assistant, slots.system, slots.observation or "", slots.function or "", slots.prefix])
    marks = dict.fromkeys(re.findall(r"<\|[^|<>\s]+\|>|<[a-z_]+_of_turn>|\[/?INST\]", text))
    vocab = tokenizer.get_vocab()
    return [m for m in marks if m not in vocab]


def from_description(desc: dict, tokenizer) -> Template:
    """Rebuild the template recorded by `describe()` (stored in tokenized/, adapter/, merged_model/)."""
    if desc["name"] == ChatTemplateRenderer.name:
        tokenizer.chat_template = desc["chat_template"]
        return ChatTemplateRenderer(tokenizer, desc.get("default_system") or None)
    return SlotRenderer(tokenizer, SlotTemplate(**{**desc["slots"], "stop_words": tuple(desc["slots"]["stop_words"])}),
                        desc.get("default_system"))


def load_template(folder, tokenizer) -> Template:
    """The template recorded in `folder`/template.json (merged model, adapter, exports), else the
    tokenizer's own chat_template."""
    import json
    from pathlib import Path

    desc = Path(folder) / "template.json"
    if desc.is_file():
        return from_description(json.loads(desc.read_text()), tokenizer)
    return get_template(None, tokenizer)
