"""Evaluation: metric values checked against independent computations, and the MMLU scorer
against a plain per-question reference."""

import json
import math
import random
import shutil
import zipfile
from collections import Counter

import pytest
import torch

from conftest import REPO
from tuneline import mmlu, score_generation
from tuneline.errors import TunelineError

# ---------------------------------------------------------------- BLEU / ROUGE


def ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def reference_bleu(hyp, ref):
    """Sentence BLEU-4 without smoothing (every n-gram order has a match here), brevity penalty."""
    logs = []
    for n in range(1, 5):
        h, r = ngrams(hyp, n), ngrams(ref, n)
        logs.append(math.log(sum((h & r).values()) / sum(h.values())))
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return 100 * bp * math.exp(sum(logs) / 4)


def f1(overlap, n_hyp, n_ref):
    p, r = overlap / n_hyp, overlap / n_ref
    return 0.0 if overlap == 0 else 100 * 2 * p * r / (p + r)


def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def reference_rouge(hyp, ref):
    out = {}
    for n in (1, 2):
        h, r = ngrams(hyp, n), ngrams(ref, n)
        out[f"rouge-{n}"] = f1(sum((h & r).values()), sum(h.values()), sum(r.values()))
    out["rouge-l"] = f1(lcs(hyp, ref), len(hyp), len(ref))
    return out


# (prediction, label, BLEU tokens of each as sacrebleu's 13a / zh tokenizers split them, ROUGE tokens)
CASES = [
    ("I am Tuna, an assistant made by the Tuneline project.",
     "I am Tuna, an AI assistant developed by the Tuneline project.",
     "I am Tuna , an assistant made by the Tuneline project .".split(),
     "I am Tuna , an AI assistant developed by the Tuneline project .".split(),
     "i am tuna an assistant made by the tuneline project".split(),
     "i am tuna an ai assistant developed by the tuneline project".split()),
    ("我是 Tuna，由 Tuneline 开发的助手。",
     "我是 Tuna，由 Tuneline 开发的人工智能助手。",
     ["我", "是", "Tuna", "，", "由", "Tuneline", "开", "发", "的", "助", "手", "。"],
     ["我", "是", "Tuna", "，", "由", "Tuneline", "开", "发", "的", "人", "工", "智", "能", "助", "手", "。"],
     ["我", "是", "tuna", "由", "tuneline", "开", "发", "的", "助", "手"],
     ["我", "是", "tuna", "由", "tuneline", "开", "发", "的", "人", "工", "智", "能", "助", "手"]),
]


@pytest.mark.parametrize("pred, label, bleu_hyp, bleu_ref, rouge_hyp, rouge_ref", CASES)
def test_each_metric_matches_an_independent_computation(pred, label, bleu_hyp, bleu_ref, rouge_hyp, rouge_ref):
    assert score_generation.bleu4(pred, label) == pytest.approx(reference_bleu(bleu_hyp, bleu_ref), abs=1e-6)
    ours = score_generation.rouge(pred, label)
    for key, value in reference_rouge(rouge_hyp, rouge_ref).items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def test_scores_are_means_over_samples_and_chinese_is_not_one_token():
    pairs = [(c[0], c[1]) for c in CASES]
    result = score_generation.score(pairs)
    expected_l = (reference_rouge(CASES[0][4], CASES[0][5])["rouge-l"] + reference_rouge(CASES[1][4], CASES[1][5])["rouge-l"]) / 2
    assert result["rouge-l"] == pytest.approx(expected_l, abs=1e-4)
    # a whitespace tokenizer would see one Chinese "word" and score 0 or 100; ours sees characters
    assert 0 < score_generation.score([("我是助手", "我是人工智能助手")])["rouge-1"] < 100
    # sentence BLEU uses the effective order: an exact short answer scores 100, not 0
    assert score_generation.score([("Yes", "Yes")])["bleu-4"] == pytest.approx(100)
    assert score_generation.score([("No", "Yes")]) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


# ---------------------------------------------------------------- MMLU

SAMPLE = REPO / "resources" / "eval"


def reference_letters(model, tokenizer, bench_dir, split, n_shot, seed):
    """LLaMA-Factory's recipe written out plainly: one question at a time, no padding."""
    bench = mmlu.Benchmark(str(bench_dir), "mmlu")
    rng = random.Random(seed)
    letter_ids = [tokenizer.encode(c, add_special_tokens=False)[-1] for c in "ABCD"]
    letters, prompts = [], []
    for subject, info in sorted(bench.mapping.items()):
        dev = bench.rows(subject, "train")
        for row in bench.rows(subject, split):
            shots = rng.sample(dev, min(n_shot, len(dev)))
            q = lambda r: f"{r['question']}\nA. {r['A']}\nB. {r['B']}\nC. {r['C']}\nD. {r['D']}\nAnswer:"
            text = "".join(q(s) + s["answer"] + "\n\n" for s in shots) + q(row)
            text = f"The following are multiple choice questions (with answers) about {info['name']}.\n\n" + text
            prompts.append(text)
            ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
            with torch.no_grad():
                logprobs = model(input_ids=ids).logits[0, -1].log_softmax(-1)
            letters.append("ABCD"[int(torch.argmax(logprobs[letter_ids]))])
    return letters, prompts


@pytest.fixture(scope="module")
def tiny_lm(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("n_shot, batch_size", [(0, 1), (3, 4), (5, 7)])
def test_mmlu_scorer_agrees_with_the_reference_question_by_question(tiny_lm, n_shot, batch_size):
    model, tokenizer = tiny_lm
    result = mmlu.evaluate(model, tokenizer, mmlu.Benchmark(str(SAMPLE), "mmlu"), "test", n_shot, "en", 42, batch_size)
    ours = [letter for subject in sorted(result["predictions"]) for letter in result["predictions"][subject].values()]
    expected, _ = reference_letters(model, tokenizer, SAMPLE, "test", n_shot, 42)
    assert ours == expected
    answers = [r["answer"] for s in sorted(json.loads((SAMPLE / "mmlu" / "mapping.json").read_text()))
               for r in mmlu.Benchmark(str(SAMPLE), "mmlu").rows(s, "test")]
    assert result["accuracy"]["Average"] == round(100 * sum(a == b for a, b in zip(ours, answers)) / len(answers), 2)
    assert set(result["accuracy"]) == {"Average", "STEM", "Social Sciences", "Humanities"}


def test_mmlu_prompt_is_llamafactory_fewshot_text(tiny_lm):
    model, tokenizer = tiny_lm
    _, prompts = reference_letters(model, tokenizer, SAMPLE, "test", 2, 0)
    rng = random.Random(0)
    bench = mmlu.Benchmark(str(SAMPLE), "mmlu")
    dev = bench.rows("elementary_mathematics", "train")
    row = bench.rows("elementary_mathematics", "test")[0]
    messages = mmlu.build_messages("elementary mathematics", rng.sample(dev, 2), row, "en")
    ids = mmlu.get_template("fewshot", tokenizer).encode_prompt(messages)
    assert tokenizer.decode(ids) == prompts[0]
    assert prompts[0].endswith("What is 6 x 8?\nA. 42\nB. 48\nC. 54\nD. 56\nAnswer:")


def test_zip_layout_and_ceval_cmmlu_headers(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    shutil.copy(SAMPLE / "mmlu" / "mapping.json", folder)
    with zipfile.ZipFile(folder / "mmlu.zip", "w") as z:  # the upstream packaging
        for csv in (SAMPLE / "mmlu").rglob("*.csv"):
            z.write(csv, csv.relative_to(SAMPLE / "mmlu").as_posix())
    assert mmlu.Benchmark(str(tmp_path), "mmlu").rows("world_history", "test") == \
        mmlu.Benchmark(str(SAMPLE), "mmlu").rows("world_history", "test")
    ceval = mmlu.parse_csv("id,question,A,B,C,D,answer,explanation\n0,1+1=?,1,2,3,4,B,\n", "x.csv")
    cmmlu = mmlu.parse_csv(",Question,A,B,C,D,Answer\n0,1+1=?,1,2,3,4,B\n", "y.csv")
    assert ceval == cmmlu == [{"question": "1+1=?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B"}]
    with pytest.raises(TunelineError, match="z.csv, line 1: answer 'E'"):
        mmlu.parse_csv("q,1,2,3,4,E\n", "z.csv")
    with pytest.raises(TunelineError, match="mapping.json not found"):
        mmlu.Benchmark(str(tmp_path), "cmmlu")
