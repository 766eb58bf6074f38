"""Rule `eval_summary`: base vs tuned side by side, with the delta (summary.md and summary.json)."""

from __future__ import annotations

import json
from pathlib import Path


def rows(base: dict, tuned: dict) -> list[dict]:
    out = []
    for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l") if tuned["generation"] else ():
        out.append({"metric": metric, "base": base["generation"][metric], "tuned": tuned["generation"][metric]})
    for metric, label in (("accuracy", "reward accuracy"), ("mean_margin", "reward margin")) if tuned["pairwise"] else ():
        out.append({"metric": label, "base": base["pairwise"][metric], "tuned": tuned["pairwise"][metric]})
    for category in tuned["mmlu"]["accuracy"] if tuned["mmlu"] else ():
        out.append({"metric": f"{tuned['mmlu']['task']} {category}", "base": base["mmlu"]["accuracy"].get(category),
                    "tuned": tuned["mmlu"]["accuracy"][category]})
    for row in out:
        row["delta"] = None if row["base"] is None else round(row["tuned"] - row["base"], 4)
    return out


def markdown(table: list[dict], tuned: dict) -> str:
    parts = []
    if tuned["generation"]:
        parts.append(f"Generation metrics on {tuned['generation']['samples']} eval-split samples (percent; see "
                     "tuneline/score_generation.py for how each is computed)")
    elif tuned["mmlu"]:
        parts.append("No generation metrics: stage pt data has no responses to score")
    if tuned["pairwise"]:
        parts.append(f"reward-model pairwise accuracy (percent: chosen scored above rejected) and mean margin on "
                     f"{tuned['pairwise']['pairs']} eval-split pairs; the base is the base model with a new value head")
    if tuned["mmlu"]:
        parts.append(f"multiple-choice accuracy (percent) on {tuned['mmlu']['questions']} questions")
    lines = ["# Evaluation: base vs tuned\n", "; ".join(parts) + ".\n",
             "| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for r in table:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.2f}"
        lines.append(f"| {r['metric']} | {fmt(r['base'])} | {fmt(r['tuned'])} | {delta} |")
    return "\n".join(lines) + "\n"


def main(inputs, outputs, params, log, threads=1):
    load = lambda key: json.loads(Path(inputs[key]).read_text()) if key in inputs else None
    base, tuned = ({kind: load(f"{model}_{kind}") for kind in ("generation", "mmlu", "pairwise")}
                   for model in ("base", "tuned"))
    table = rows(base, tuned)
    Path(outputs["json"]).write_text(json.dumps({"rows": table, "base": base, "tuned": tuned}, indent=2) + "\n")
    text = markdown(table, tuned)
    Path(outputs["markdown"]).write_text(text)
    log.info("\n%s", text)
