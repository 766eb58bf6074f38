"""Rule `merge`: the adapter merged into the full-precision base, and proof that the merge is right.

merge_report.json records, on a few fixed prompts rendered with the training template:
- merge_error: max |logit difference| between the adapter applied on the base (unmerged) and
  the merged model; the rule fails above `merge_tolerance` (fp32 rounding alone is ~1e-4).
- for a QLoRA adapter, quantization_error: the same comparison against the quantized model the
  adapter was trained on. It is not a merge bug: nf4 alone moves SmolLM2's logits by up to ~15.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import TunelineError
from .modeling import load_causal_lm, pad_id
from .templates import SlotRenderer, from_description
from .verify import CHECK_PROMPTS, compare, prompt_logits


def main(inputs, outputs, params, log, threads=1):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = Path(inputs["adapter"])
    report_in = json.loads((adapter / "train_report.json").read_text())
    template_desc = json.loads((adapter / "template.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    template = from_description(template_desc, tokenizer)

    log.info("loading the base in fp32 and applying the adapter")
    model = PeftModel.from_pretrained(load_causal_lm(inputs["model"], torch.float32), adapter)
    with_adapter = prompt_logits(model, template)
    merged = model.merge_and_unload()
    merged_logits = prompt_logits(merged, template)
    report = {"merge_error": compare(with_adapter, merged_logits), "merge_tolerance": params["merge_tolerance"],
              "prompts": CHECK_PROMPTS}
    log.info("merge error: max |logit diff| %.2e (tolerance %.0e)",
             report["merge_error"]["max_abs_logit_diff"], params["merge_tolerance"])

    quant = report_in.get("quantization")
    if quant:
        log.info("loading the %d-bit base the adapter was trained on, for the quantization error", quant["bits"])
        qmodel = PeftModel.from_pretrained(load_causal_lm(inputs["model"], torch.float32, quant), adapter)
        report["quantization_error"] = {
            **compare(prompt_logits(qmodel, template), merged_logits),
            "note": "trained (quantized base + adapter) vs merged into the full-precision base; "
                    "this is quantization, not a merge fault",
        }
        log.info("quantization error (trained %d-bit model vs merged): max |logit diff| %.2f, top-1 agreement %.0f%%",
                 quant["bits"], report["quantization_error"]["max_abs_logit_diff"],
                 100 * report["quantization_error"]["top1_agreement"])
        del qmodel

    out = Path(outputs["model"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["merge_error"]["max_abs_logit_diff"] > params["merge_tolerance"]:
        raise TunelineError(
            f"merge check failed: the merged model's logits differ from the adapter-on-base model's by "
            f"{report['merge_error']['max_abs_logit_diff']:.3g} > merge_tolerance={params['merge_tolerance']} "
            f"(see {out / 'merge_report.json'})."
        )
    if isinstance(template, SlotRenderer):
        tokenizer.chat_template = template.to_jinja()  # HF users get the training format
    merged.generation_config.eos_token_id = template.stop_token_ids()
    merged.generation_config.pad_token_id = pad_id(tokenizer)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(adapter / "template.json", out / "template.json")
    return {"merge_report": report}
