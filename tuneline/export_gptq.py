"""Rule `export_gptq`: GPTQ quantization of the merged model (LLaMA-Factory's export_quantization_*).

Calibration texts are conversations from the registry (`export_quantization_dataset`, default:
the training split), rendered with the training template, cut to `export_quantization_maxlen`
tokens and drawn with `seed`: the same config gives the same calibration set (LLaMA-Factory's
sampling is unseeded). Quantization goes through transformers' GPTQConfig with optimum and
gptqmodel (`pip install '.[gptq]'`) and needs a CUDA GPU: on a CPU-only machine the rule stops
before loading anything. The result is reloaded and compared with the merged model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .errors import TunelineError
from .jsonl import read_jsonl
from .registry import is_data_file
from .templates import load_template
from .verify import behaviour, compare_behaviour

BITS = (2, 3, 4, 8)
MIN_TOP1 = {8: 0.85, 4: 0.5, 3: 0.2, 2: 0.0}


def require_cuda_and_libraries() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise TunelineError(
            "export_gptq needs a CUDA GPU (GPTQ calibrates layer by layer on the GPU) and this machine has none. "
            "Use export_gguf or export_bnb here, or run this rule on a GPU node (profiles/slurm)."
        )
    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelineError(f"export_gptq needs {' and '.join(missing)}: pip install '.[gptq]'.")


def calibration_texts(examples: list[dict], template, tokenizer, nsamples: int, maxlen: int, seed: int, log) -> list[str]:
    """`nsamples` conversations drawn with `seed`, rendered with the template, at most `maxlen` tokens each."""
    if len(examples) < nsamples:
        log.info("calibration: only %d examples for export_quantization_nsamples=%d: using all of them",
                 len(examples), nsamples)
    chosen = random.Random(seed).sample(examples, min(nsamples, len(examples)))
    texts, cut = [], 0
    for ex in chosen:
        if "text" in ex:  # stage pt: raw text, as training saw it
            ids = tokenizer(ex["text"], add_special_tokens=False)["input_ids"]
        else:
            ids = [i for s, t in template.encode_turns(ex["messages"], ex.get("system", ""), ex.get("tools", ""))
                   for i in s + t]
        if len(ids) > maxlen:
            cut += 1
            ids = ids[:maxlen]
        texts.append(tokenizer.decode(ids))
    if cut:
        log.info("calibration: %d of %d samples cut to export_quantization_maxlen=%d tokens", cut, len(texts), maxlen)
    return texts


def load_examples(inputs: dict, params: dict, log) -> list[dict]:
    if inputs.get("data"):
        return read_jsonl(Path(inputs["data"]) / "train.jsonl")
    source = params["export_quantization_dataset"]
    if is_data_file(source):  # LLaMA-Factory's form: a file whose `text` column is the calibration text
        from .records import read_file

        records = read_file(Path(source).expanduser())
        texts = [{"text": r["text"]} for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
        if not texts:
            raise TunelineError(f"export_quantization_dataset {source}: no record has a `text` column (LLaMA-Factory's "
                                "calibration files do); give registry names for conversation data.")
        if len(texts) < len(records):
            log.info("calibration: %d of %d records of %s have no text and are skipped", len(records) - len(texts),
                     len(records), source)
        return texts
    from .records import collect_for

    return collect_for(params, log)[0]


def main(inputs, outputs, params, log, threads=1):
    bits = int(params["bits"])
    if bits not in BITS:
        raise TunelineError(f"export_gptq: GPTQ takes {', '.join(map(str, BITS))} bits, not {bits} "
                            f"(results/export/gptq-<bits>bit).")
    require_cuda_and_libraries()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    from .modeling import load_for_inference, require_causal_lm

    model_dir, out = Path(inputs["model"]), Path(outputs["model"])
    require_causal_lm(model_dir, "the GPTQ export")  # before calibrating: the reference is loaded later
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = load_template(model_dir, tokenizer)
    texts = calibration_texts(load_examples(inputs, params, log), template, tokenizer,
                              params["export_quantization_nsamples"], params["export_quantization_maxlen"],
                              params["seed"], log)
    reference = behaviour(load_for_inference(model_dir).to("cuda"), template, tokenizer)
    log.info("GPTQ %d-bit with %d calibration samples", bits, len(texts))
    config = GPTQConfig(bits=bits, dataset=texts, tokenizer=tokenizer, model_seqlen=params["export_quantization_maxlen"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, device_map="auto",
                                                 dtype=torch.float16, use_safetensors=True).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=f"{params['export_size']}GB")
    tokenizer.save_pretrained(out)
    shutil.copy(model_dir / "template.json", out / "template.json")
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="auto", use_safetensors=True).eval()
    vs_merged = compare_behaviour(reference, reloaded, template, tokenizer)
    min_top1 = MIN_TOP1[bits] if params["export_min_top1"] is None else params["export_min_top1"]
    files = sorted(p.name for p in out.iterdir())
    report = {"format": f"GPTQ {bits}-bit", "calibration_samples": len(texts), "files": files,
              "bytes": sum((out / f).stat().st_size for f in files),
              "vs_merged_model": {**vs_merged, "min_top1_agreement": min_top1},
              "merged_answers": reference["answers"], "gpu": torch.cuda.get_device_name(0)}
    (out / "export_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    log.info("reloaded: top-1 agreement with the merged model %.0f%%, greedy answers %s",
             100 * vs_merged["top1_agreement"], vs_merged["same_greedy_answers"])
    if vs_merged["top1_agreement"] < min_top1:
        raise TunelineError(f"GPTQ export check failed: top-1 agreement {vs_merged['top1_agreement']:.2f} < "
                            f"{min_top1} (export_min_top1; see {out / 'export_report.json'}).")
    return {"export_report": {k: report[k] for k in ("format", "bytes", "calibration_samples")}}
