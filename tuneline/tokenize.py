"""Rule `tokenize`: each split rendered with the template and encoded by the stage
(tuneline/stages/<stage>.py: sft masks the prompt, pt windows raw text, dpo writes TRL's pair
columns), cut to cutoff_len. Truncated and dropped examples are counted in the log and stats.json;
most of a split lost to truncation fails the rule.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import encoding, stages
from .errors import TunelineError
from .jsonl import read_jsonl
from .templates import get_template


def main(inputs, outputs, params, log, threads=1):
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    template = get_template(params["template"], tokenizer, params["default_system"], log)
    stage = stages.get(params["stage"])
    log.info("template: %s", template.name)
    out = Path(outputs["tokenized"])
    out.mkdir(parents=True, exist_ok=True)
    all_stats = {}
    for split in ("train", "validation"):
        source = inputs["data"] if split == "train" else inputs.get("eval_data", inputs["data"])
        examples = read_jsonl(Path(source) / f"{split}.jsonl")
        with encoding.workers(threads):  # data_job_cpus (LLaMA-Factory's preprocessing_num_workers)
            columns, all_stats[split] = stage.encode(template, examples, params, log, split)
        if split == "train" and not any(columns.values()):
            raise TunelineError("no training examples left after tokenization (all were dropped); "
                                "raise cutoff_len or check the data.")
        if any(columns.values()):  # no folder for an empty split (val_size: 0)
            datasets.Dataset.from_dict(columns).save_to_disk(str(out / split))
    (out / "template.json").write_text(json.dumps(template.describe(), indent=2, ensure_ascii=False) + "\n")
    (out / "stats.json").write_text(json.dumps(all_stats, indent=2) + "\n")
    for split, stats in all_stats.items():  # gate: most of a split lost to truncation is a config error
        dropped = stats.get("dropped_no_labels", 0)
        if dropped * 2 > dropped + stats["examples"]:
            raise TunelineError(f"{split}: {dropped} of {dropped + stats['examples']} examples had no response "
                                f"token left after truncation to cutoff_len={params['cutoff_len']} (stats.json): "
                                "raise cutoff_len.")
    return {"stats": all_stats, "template": template.name}
