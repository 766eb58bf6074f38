"""`tuneline chat`: talk to a model folder or a GGUF file with the template it was trained with.

A merged model (results/merged_model) and an export folder carry template.json from training, so
prompts are rendered exactly as in training; anything else falls back to the tokenizer's
chat_template (for a GGUF file: the one in its metadata).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .config import defaults
from .errors import TunelineError
from .modeling import load_for_inference, pad_id, require_safetensors
from .generation import generation_kwargs
from .templates import load_template



class Chat:
    def __init__(self, model_dir: str, generation: dict | None = None, system: str = "", base: str | None = None):
        """`model_dir`: a model folder, a .gguf file, or a LoRA adapter folder applied (unmerged, with PEFT) to
        `base` (default: the base named in its adapter_config.json, e.g. results/base_model for results/adapter)."""
        from transformers import AutoTokenizer

        path = Path(model_dir)
        if (path / "adapter_config.json").is_file():
            import json

            from peft import PeftModel

            require_safetensors(path)
            base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base or not (Path(base) / "config.json").is_file():
                raise TunelineError(f"{model_dir} is a LoRA adapter; its base model {base!r} is not a model folder here: "
                                    "give it with --base (e.g. results/base_model).")
            self.tokenizer = AutoTokenizer.from_pretrained(path if (path / "tokenizer_config.json").is_file() else base)
            self.model = PeftModel.from_pretrained(load_for_inference(base), path).eval()
        elif path.suffix == ".gguf" and path.is_file():
            import torch
            from transformers import AutoModelForCausalLM

            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
            path = path.parent
        elif (path / "config.json").is_file():
            require_safetensors(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = load_for_inference(path)
        else:
            raise TunelineError(f"{model_dir} is neither a model folder (no config.json) nor a .gguf file; run "
                                f"`snakemake --cores 4 results/merged_model` first, or give a model folder or GGUF.")
        self.template = load_template(path, self.tokenizer)
        self.generation = generation_kwargs({**defaults(), **(generation or {})})
        self.system = system
        self.history: list[dict] = []

    def reply(self, text: str, stream=None) -> str:
        import threading

        import torch
        from transformers import TextIteratorStreamer

        messages = self.history + [{"role": "user", "content": text}]
        ids = torch.tensor([self.template.encode_prompt(messages, self.system)])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      eos_token_id=self.template.stop_token_ids(),
                      pad_token_id=pad_id(self.tokenizer), **self.generation)
        failed = []

        def generate():
            try:
                self.model.generate(**kwargs)
            except Exception as err:  # noqa: BLE001 (raised below, in the caller's thread)
                failed.append(err)
                streamer.end()  # else the loop below waits for pieces forever

        worker = threading.Thread(target=generate)
        worker.start()
        pieces = []
        for piece in streamer:
            if not pieces or not "".join(pieces).strip():
                piece = piece.lstrip()  # what is shown is what is kept: the stripped answer
            pieces.append(piece)
            if stream and piece:
                stream.write(piece)
                stream.flush()
        worker.join()
        if failed:
            raise failed[0]
        answer = "".join(pieces).strip()
        self.history = messages + [{"role": "assistant", "content": answer}]
        return answer


def interactive(chat: Chat) -> None:
    print("Chatting with the model. /clear forgets the conversation, /exit quits.")
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text == "/exit":
            return
        if text == "/clear":
            chat.history = []
            print("(history cleared)")
            continue
        if not text:
            continue
        sys.stdout.write("Assistant: ")
        chat.reply(text, stream=sys.stdout)
        sys.stdout.write("\n")
