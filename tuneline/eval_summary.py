"""Rule `eval_summary`: base vs tuned side by side, with the delta (summary.md and summary.json)."""

from __future__ import annotations

import json
from pathlib import Path


def rows(base: dict, tuned: dict) -> list[dict]:
    out = []
    for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l") if tuned["generation"] else ():
        out.append({"metric": metric, "base": base["generation"][metric], "tuned": tuned["generation"][metric]})
    for category in tuned["mmlu"]["accuracy"]:
        out.append({"metric": f"{tuned['mmlu']['task']} {category}", "base": base["mmlu"]["accuracy"].get(category),
                    "tuned": tuned["mmlu"]["accuracy"][category]})
    for row in out:
        row["delta"] = None if row["base"] is None else round(row["tuned"] - row["base"], 4)
    return out


def markdown(table: list[dict], samples: int | None, questions: int) -> str:
    generation = ("No generation metrics: stage pt data has no responses to score. " if samples is None else
                  f"Generation metrics on {samples} eval-split samples (percent; see tuneline/score_generation.py "
                  f"for how each is computed); ")
    lines = ["# Evaluation: base vs tuned\n",
             f"{generation}multiple-choice accuracy (percent) on {questions} questions.\n",
             "| metric | base | tuned | delta |", "|---|---:|---:|---:|"]
    for r in table:
        fmt = lambda v: "–" if v is None else f"{v:.2f}"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.2f}"
        lines.append(f"| {r['metric']} | {fmt(r['base'])} | {fmt(r['tuned'])} | {delta} |")
    return "\n".join(lines) + "\n"


def main(inputs, outputs, params, log, threads=1):
    load = lambda key: json.loads(Path(inputs[key]).read_text()) if key in inputs else None
    base = {"generation": load("base_generation"), "mmlu": load("base_mmlu")}
    tuned = {"generation": load("tuned_generation"), "mmlu": load("tuned_mmlu")}
    table = rows(base, tuned)
    Path(outputs["json"]).write_text(json.dumps({"rows": table, "base": base, "tuned": tuned}, indent=2) + "\n")
    text = markdown(table, tuned["generation"]["samples"] if tuned["generation"] else None, tuned["mmlu"]["questions"])
    Path(outputs["markdown"]).write_text(text)
    log.info("\n%s", text)
