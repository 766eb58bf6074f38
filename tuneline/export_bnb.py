"""Rule `export_bnb`: the merged model serialised in bitsandbytes 4-bit (nf4/fp4) or 8-bit.

The folder loads with a plain `AutoModelForCausalLM.from_pretrained` (its config.json carries the
quantization_config). After saving, the folder is loaded back and must reproduce the in-memory
quantized model exactly; export_report.json records that and what quantization cost against the
merged model (top-1 agreement, greedy answers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import TunelineError
from .modeling import compute_dtype, load_causal_lm, load_for_inference, set_threads
from .templates import load_template
from .verify import behaviour, compare_to

# The least top-1 next-token agreement with the merged model. Measured on SmolLM2-135M: 8-bit ~0.9,
# nf4 0.74 for a merge into the original weights but 0.44 for the default merge_base dequantized
# (re-quantizing weights that already sit on a shifted nf4 grid); a 4-bit 135M model drifts.
MIN_TOP1 = {8: 0.85, 4: 0.35}
RELOAD_TOLERANCE = 1e-4  # the reloaded folder vs the model that was saved: bit-for-bit weights


def main(inputs, outputs, params, log, threads=1):
    from transformers import AutoTokenizer

    set_threads(threads)
    bits = int(params["bits"])
    if bits not in MIN_TOP1:
        raise TunelineError(f"export_bnb: {bits}-bit is not a bitsandbytes format; ask for bnb-4bit or bnb-8bit.")
    model_dir, out = Path(inputs["model"]), Path(outputs["model"])
    reference_model = load_for_inference(model_dir, "the bitsandbytes export")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = load_template(model_dir, tokenizer)
    reference = behaviour(reference_model, template, tokenizer)
    del reference_model  # before the quantized copy is loaded

    quant = {"bits": bits, "type": params["quantization_type"], "double": params["double_quantization"]}
    dtype = compute_dtype(False, False)
    log.info("quantizing %s to %s", model_dir, f"4-bit {quant['type']}" if bits == 4 else "8-bit")
    if bits == 8:
        import logging

        log.info("8-bit matmuls take fp16 inputs (bitsandbytes casts them; its per-call warning is silenced)")
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    model = load_causal_lm(model_dir, dtype, quant).eval()
    in_memory = behaviour(model, template, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=f"{params['export_size']}GB")
    tokenizer.save_pretrained(out)
    shutil.copy(model_dir / "template.json", out / "template.json")
    del model

    log.info("reloading %s", out)
    reloaded = load_causal_lm(out, dtype).eval()  # its config.json carries the quantization
    mine = behaviour(reloaded, template, tokenizer)  # generated once, compared twice
    reload_check = compare_to(in_memory, mine)
    vs_merged = compare_to(reference, mine)
    files = sorted(p.name for p in out.iterdir())
    report = {
        "format": f"bitsandbytes {bits}-bit" + (f" {quant['type']}" + (" double-quant" if quant["double"] else "")
                                                 if bits == 4 else ""),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
        "reload_vs_saved": reload_check,
        "vs_merged_model": dict(vs_merged),
        "merged_answers": reference["answers"],
    }
    log.info("reloaded: max |logit diff| vs the saved model %.2g; vs the merged model: top-1 agreement %.0f%%, "
             "greedy answers %s", reload_check["max_abs_logit_diff"], 100 * vs_merged["top1_agreement"],
             vs_merged["same_greedy_answers"])
    min_top1 = MIN_TOP1[bits] if params["export_min_top1"] is None else params["export_min_top1"]
    report["vs_merged_model"]["min_top1_agreement"] = min_top1
    problems = []
    if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
        problems.append("a pickle weight file was written")
    if reload_check["max_abs_logit_diff"] > RELOAD_TOLERANCE:
        problems.append(f"the reloaded folder differs from the saved model by {reload_check['max_abs_logit_diff']:.3g}")
    if vs_merged["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement with the merged model {vs_merged['top1_agreement']:.2f} < {min_top1} "
                        "(export_min_top1)")
    (out / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if problems:
        raise TunelineError("bitsandbytes export check failed: " + "; ".join(problems) +
                            f" (see {out / 'export_report.json'}).")
    return {"export_report": {k: report[k] for k in ("format", "bytes")}}
