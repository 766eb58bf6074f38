"""Rule `score_generation`: BLEU-4 and ROUGE-1/2/L of generated predictions against their labels.

How each number is computed (LLaMA-Factory's key names, values in percent):
- bleu-4: sacrebleu's sentence BLEU per sample (4-gram, exponential smoothing), averaged over
  samples like LLaMA-Factory. The tokenizer is sacrebleu's `zh` for a sample whose label
  contains CJK characters (each CJK character is a token, Latin words stay words), else `13a`.
  LLaMA-Factory instead runs nltk's sentence BLEU on characters for every language (smoothing
  method3), so its English BLEU is a character BLEU and comes out higher.
- rouge-1/2/l: rouge-score's F-measure per sample, averaged, with a CJK-aware tokenizer: each CJK
  character is a token, other text is lower-cased words (no stemming). LLaMA-Factory segments
  Chinese with jieba into words first, so its Chinese ROUGE works on words, ours on characters.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .jsonl import read_jsonl

CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+", re.UNICODE)


class CJKTokenizer:
    """rouge-score tokenizer: CJK characters one by one, other text as lower-cased words."""

    def tokenize(self, text: str) -> list[str]:
        return TOKEN.findall(text.lower())


def bleu4(prediction: str, label: str) -> float:
    import sacrebleu

    tokenize = "zh" if CJK.search(label) else "13a"
    return sacrebleu.sentence_bleu(prediction, [label], tokenize=tokenize, smooth_method="exp").score


def rouge(prediction: str, label: str) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=CJKTokenizer())
    scores = scorer.score(label, prediction)
    return {f"rouge-{k[-1].lower()}": 100 * v.fmeasure for k, v in scores.items()}


def score(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean per-sample scores over (prediction, label) pairs, rounded to 4 places."""
    totals = {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    for prediction, label in pairs:
        totals["bleu-4"] += bleu4(prediction, label)
        for key, value in rouge(prediction, label).items():
            totals[key] += value
    n = max(len(pairs), 1)
    return {key: round(value / n, 4) for key, value in totals.items()}


def main(inputs, outputs, params, log, threads=1):
    rows = read_jsonl(inputs["predictions"])
    result = {**score([(r["predict"], r["label"]) for r in rows]), "samples": len(rows)}
    Path(outputs["scores"]).write_text(json.dumps(result, indent=2) + "\n")
    log.info("%d predictions: %s", len(rows), ", ".join(f"{k} {v:.2f}" for k, v in result.items() if k != "samples"))
    return {"scores": result}
