"""Rule `merge`: the adapter merged into the full-precision base, and proof that the merge is right.

merge_report.json records, on a few fixed prompts rendered with the training template:
- merge_error: max |logit difference| between the adapter applied on the base (unmerged) and
  the merged model (fp32 rounding alone is ~1e-4).
- for a QLoRA adapter, trained_vs_merged: the trained model (quantized base + adapter) against
  the merge into the dequantized base and into the original base. The original base differs by
  what quantization changed (nf4 moves SmolLM2's logits by up to ~15); the dequantized one must
  reproduce the trained model.
- gates: each figure that says "the saved model is right", with its limit (config keys
  merge_tolerance, merge_min_top1, merge_original_min_top1). One over its limit fails the rule
  and nothing is saved under results/merged_model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import TunelineError
from .modeling import is_reward_model, load_causal_lm, packed_4bit_weights, pad_id
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

    if not (adapter / "adapter_config.json").is_file():  # freeze / full tuning: already a full model
        log.info("%s tuning wrote a full model: nothing to merge, passing it through",
                 report_in.get("finetuning_type", "full"))
        merged = load_causal_lm(adapter, torch.float32)
        report = {"finetuning_type": report_in.get("finetuning_type"), "merged": False,
                  "note": "the train output is the tuned model itself; saved with tokenizer and template"}
        return save_merged(merged, tokenizer, template, adapter, Path(outputs["model"]), report, params)

    quant = report_in.get("quantization")
    reward = is_reward_model(adapter)  # stage rm: the base gets the value head the adapter carries
    merge_base = params["merge_base"] if quant else "original"
    report = {"finetuning_type": "lora", "merged": True, "merge_base": merge_base,
              "merge_tolerance": params["merge_tolerance"], "prompts": CHECK_PROMPTS}
    log.info("loading the base in fp32 and applying the adapter")
    merged, report["merge_error"], merged_logits = merge_into(load_causal_lm(inputs["model"], torch.float32, reward=reward),
                                                              adapter, template)
    if quant:
        log.info("loading the %d-bit base the adapter was trained on", quant["bits"])
        qmodel = PeftModel.from_pretrained(load_causal_lm(inputs["model"], torch.float32, quant, reward), adapter).eval()
        trained_logits = prompt_logits(qmodel, template)
        packed = packed_4bit_weights(qmodel)
        if packed:  # standard_4bit_layout failed to keep bitsandbytes from repacking: dequantize would be garbage
            raise TunelineError(f"bitsandbytes rewrote {len(packed)} 4-bit weights (e.g. {packed[0]}) into its CPU "
                                "inference layout, which dequantize() cannot read: the merge would be garbage. "
                                "Report this with your bitsandbytes version and `lscpu` flags.")
        log.info("merging into the dequantized %d-bit weights as well", quant["bits"])
        dequantized = qmodel.unload().dequantize().to(torch.float32)
        merged_dq, error_dq, logits_dq = merge_into(dequantized, adapter, template)
        report["trained_vs_merged"] = {
            "original": compare(trained_logits, merged_logits),
            "dequantized": compare(trained_logits, logits_dq),
            "note": "the trained model (quantized base + adapter) against each merge: `original` shows "
                    "what quantization changed, `dequantized` reproduces the trained model",
        }
        report["quantization_error"] = report["trained_vs_merged"]["original"]
        report["trained_vs_saved"] = report["trained_vs_merged"][merge_base]
        for name, diff in report["trained_vs_merged"].items():
            if name != "note":
                log.info("trained %d-bit model vs merge into the %s base: max |logit diff| %.3g, top-1 agreement "
                         "%.0f%%", quant["bits"], name, diff["max_abs_logit_diff"], 100 * diff["top1_agreement"])
        if merge_base == "dequantized":
            merged, report["merge_error"] = merged_dq, error_dq
        del qmodel
    log.info("merge error (%s base): max |logit diff| %.2e (tolerance %.0e)", merge_base,
             report["merge_error"]["max_abs_logit_diff"], params["merge_tolerance"])
    report.setdefault("trained_vs_saved", report["merge_error"])  # LoRA on a full-precision base: the same model
    return save_merged(merged, tokenizer, template, adapter, Path(outputs["model"]), report, params)


def merge_into(base, adapter: Path, template):
    """The adapter applied on `base`, merged; with the merge error and the merged model's logits."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, adapter)
    with_adapter = prompt_logits(model, template)
    merged = model.merge_and_unload()
    merged_logits = prompt_logits(merged, template)
    return merged, compare(with_adapter, merged_logits), merged_logits


def gates(report: dict, params: dict) -> list[dict]:
    """The figures that must hold for the saved model to count as the trained one."""
    if not report.get("merged"):
        return []
    tol, top1 = params["merge_tolerance"], params["merge_min_top1"]
    rows = [("merge_error.max_abs_logit_diff", report["merge_error"]["max_abs_logit_diff"], "<=", tol,
             "merge_tolerance")]
    saved = report["trained_vs_saved"]
    if report["merge_base"] == "original" and "trained_vs_merged" in report:
        # a merge into the original weights differs from the 4-bit trained model by design
        rows.append(("trained_vs_saved.top1_agreement", saved["top1_agreement"], ">=",
                     params["merge_original_min_top1"], "merge_original_min_top1"))
    else:
        rows += [("trained_vs_saved.max_abs_logit_diff", saved["max_abs_logit_diff"], "<=", tol, "merge_tolerance"),
                 ("trained_vs_saved.top1_agreement", saved["top1_agreement"], ">=", top1, "merge_min_top1")]
    return [{"figure": f, "value": v, "limit": f"{op} {lim}", "key": key,
             "passed": bool(v <= lim if op == "<=" else v >= lim)} for f, v, op, lim, key in rows]


def save_merged(merged, tokenizer, template, adapter: Path, out: Path, report: dict, params: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report["gates"] = gates(report, params)
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    failed = [g for g in report["gates"] if not g["passed"]]
    if failed:
        raise TunelineError(
            "merge check failed: the saved model would not be the trained model: "
            + "; ".join(f"{g['figure']} = {g['value']:.4g}, must be {g['limit']} ({g['key']})" for g in failed)
            + " (merge_report.json). Nothing was saved as the merged model."
        )
    if isinstance(template, SlotRenderer):
        tokenizer.chat_template = template.to_jinja()  # HF users get the training format
    if merged.can_generate():
        merged.generation_config.eos_token_id = template.stop_token_ids()
        merged.generation_config.pad_token_id = pad_id(tokenizer)
    else:  # a reward model: its value head reads the last token that is not padding
        merged.config.pad_token_id = pad_id(tokenizer)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.copy(adapter / "template.json", out / "template.json")
    return {"merge_report": report}
