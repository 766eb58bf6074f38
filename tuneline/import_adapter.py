"""Rule `import_adapter`: a LoRA adapter trained elsewhere (LLaMA-Factory, PEFT) becomes results/adapter.

Checked before it is taken: safetensors weights, a LoRA adapter PEFT can read, target modules that
this base model has and tensor shapes that fit it (an adapter of another model fails here, naming the
first tensor that does not fit). The folder written is what train writes for merge: the adapter
files, template.json (the `template` key, as tokenize would record it) and train_report.json saying
where the adapter came from. Applying it changes the base model's logits on the check prompts by
`max_abs_logit_change` (informational: an untrained adapter changes nothing).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import TunelineError
from .modeling import is_reward_model, load_causal_lm, set_threads
from .templates import get_template
from .verify import compare, prompt_logits

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_files(adapter: Path) -> dict:
    if not (adapter / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in adapter.glob("adapter_model.*"))
        raise TunelineError(f"{adapter} has no adapter_model.safetensors" + (f" (only {', '.join(pickles)}: pickle "
                            "files can run code when loaded; convert it with PEFT's save_pretrained in a trusted "
                            "environment)" if pickles else "") + ".")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise TunelineError(f"{adapter}/adapter_config.json: peft_type {config.get('peft_type')!r}; Tuneline merges "
                            "LoRA adapters (peft_type LORA).")
    return config


def apply(base, adapter: Path):
    """The adapter on `base`, or a TunelineError naming what does not fit."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line or "not found" in line
                      or "Target modules" in line), str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise TunelineError(f"{adapter} does not fit this base model ({first}): it was trained on another model. "
                            "Set model_name_or_path to the model the adapter was trained on "
                            "(its adapter_config.json names it as base_model_name_or_path).") from None


def main(inputs, outputs, params, log, threads=1):
    import torch
    from transformers import AutoTokenizer

    set_threads(threads)
    adapter, out = Path(inputs["adapter"]).expanduser(), Path(outputs["adapter"])
    config = check_files(adapter)
    log.info("adapter %s: LoRA r=%s on %s, trained on %s", adapter, config.get("r"),
             ",".join(sorted(config.get("target_modules") or [])) if isinstance(config.get("target_modules"), list)
             else config.get("target_modules"), config.get("base_model_name_or_path"))
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    template = get_template(params["template"], tokenizer, params["default_system"], log)
    reward = is_reward_model(adapter)
    base = load_causal_lm(inputs["model"], torch.float32, reward=reward).eval()
    before = prompt_logits(base, template)
    model = apply(base, adapter)
    change = compare(before, prompt_logits(model, template))["max_abs_logit_diff"]
    log.info("the adapter fits the base; it moves the check prompts' logits by up to %.3g", change)
    out.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy(adapter / name, out / name)
    (out / "template.json").write_text(json.dumps(template.describe(), indent=2, ensure_ascii=False) + "\n")
    report = {"stage": "rm" if reward else "sft", "finetuning_type": "lora", "quantization": None,
              "imported_from": str(adapter), "base_model_name_or_path": config.get("base_model_name_or_path"),
              "max_abs_logit_change": change,
              "note": "imported, not trained here; merged into the original base weights"}
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return {"train_report": report}
