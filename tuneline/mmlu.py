"""Rule `mmlu`: MMLU / C-Eval / CMMLU accuracy from local CSVs, as LLaMA-Factory (<= v0.9.3) scores it.

Layout: `<task_dir>/<name>/mapping.json` ({subject: {"name", "category"}}) and the CSVs, either
extracted beside it or inside `<name>.zip`: mmlu `data/{dev,val,test}/<subj>_<split>.csv` (no
header), ceval `{dev,val,test}/<subj>_<split>.csv` (header id,question,A,B,C,D,answer,...),
cmmlu `{dev,test}/<subj>.csv` (header ,Question,A,B,C,D,Answer).

Prompt: for each question, `min(n_shot, len(dev))` dev examples drawn with a seeded RNG become
user/assistant turns before the question, rendered with the `fewshot` template
("Q1...\\nAnswer:A\\n\\nQ2...\\nAnswer:"), the subject line prepended to the first user turn.
Answer: the largest next-token logit among the choice letters A-D at the last prompt token.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from pathlib import Path

from .errors import TunelineError
from .modeling import load_for_inference, pad_id, set_threads
from .templates import get_template

CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
CHOICES = ("A", "B", "C", "D")
SPLIT_FILES = {"test": "test", "validation": "val", "train": "dev"}
PROMPTS = {
    "en": ("The following are multiple choice questions (with answers) about {subject}.\n\n", "\nAnswer:"),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
}


def parse_task(task: str) -> tuple[str, str]:
    name, _, split = task.partition("_")
    if split not in SPLIT_FILES:
        raise TunelineError(f"task '{task}' must be <benchmark>_<split> with split test, validation or train "
                            f"(e.g. mmlu_test, ceval_validation, cmmlu_test).")
    return name, split


class Benchmark:
    def __init__(self, task_dir: str, name: str):
        self.root = Path(task_dir) / name
        mapping = self.root / "mapping.json"
        if not mapping.is_file():
            raise TunelineError(f"{mapping} not found: task_dir must hold {name}/mapping.json and the CSVs "
                                f"(LLaMA-Factory's evaluation layout).")
        self.mapping = json.loads(mapping.read_text(encoding="utf-8"))
        for subject, info in self.mapping.items():
            if info.get("category") not in CATEGORIES:
                raise TunelineError(f"{mapping}: subject '{subject}' has category {info.get('category')!r}; "
                                    f"use one of {', '.join(CATEGORIES)}.")
        archive = self.root / f"{name}.zip"
        self.zip = zipfile.ZipFile(archive) if archive.is_file() else None

    def _names(self) -> list[str]:
        if self.zip:
            return self.zip.namelist()
        return [p.relative_to(self.root).as_posix() for p in self.root.rglob("*.csv")]

    def _read(self, name: str) -> str:
        return self.zip.read(name).decode("utf-8-sig") if self.zip else (self.root / name).read_text(encoding="utf-8-sig")

    def rows(self, subject: str, split: str) -> list[dict]:
        short = SPLIT_FILES[split]
        wanted = {f"{short}/{subject}_{short}.csv", f"{short}/{subject}.csv"}
        found = sorted(n for n in self._names() if "/".join(n.split("/")[-2:]) in wanted)
        if not found:
            return []
        return parse_csv(self._read(found[0]), f"{self.root}/{found[0]}")


def parse_csv(text: str, where: str) -> list[dict]:
    records = list(csv.reader(io.StringIO(text)))
    if not records:
        return []
    head = [h.strip().lower() for h in records[0]]
    if "question" in head and "answer" in head:  # ceval / cmmlu
        idx = {k: head.index(k.lower()) for k in ("question", *CHOICES, "answer")}
        body = records[1:]
    else:  # mmlu: question,A,B,C,D,answer
        idx = {"question": 0, "A": 1, "B": 2, "C": 3, "D": 4, "answer": 5}
        body = records
    rows = []
    for line, rec in enumerate(body, start=2 if body is not records else 1):
        try:
            row = {k: rec[i] for k, i in idx.items()}
        except IndexError:
            raise TunelineError(f"{where}, line {line}: expected question, A, B, C, D and answer columns.") from None
        if row["answer"].strip() not in CHOICES:
            raise TunelineError(f"{where}, line {line}: answer {row['answer']!r} is not one of A, B, C, D.")
        rows.append(row)
    return rows


def format_question(row: dict, cue: str) -> str:
    return row["question"] + "".join(f"\n{c}. {row[c]}" for c in CHOICES) + cue


def build_messages(subject_name: str, shots: list[dict], row: dict, lang: str) -> list[dict]:
    system, cue = PROMPTS[lang]
    messages = []
    for shot in shots:
        messages += [{"role": "user", "content": format_question(shot, cue)},
                     {"role": "assistant", "content": shot["answer"].strip()}]
    messages.append({"role": "user", "content": format_question(row, cue)})
    messages[0] = {**messages[0], "content": system.format(subject=subject_name) + messages[0]["content"]}
    return messages


def choice_token_ids(tokenizer) -> list[int]:
    return [tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]


def predict_letters(model, prompts: list[list[int]], choice_ids: list[int], batch_size: int, pad: int) -> list[str]:
    """Right-padded batches; the logits at each prompt's last real token decide among A-D."""
    import torch

    letters = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        last = logits[torch.arange(len(batch)), mask.sum(-1) - 1][:, choice_ids]
        letters += [CHOICES[i] for i in last.float().softmax(-1).argmax(-1).tolist()]
    return letters


def evaluate(model, tokenizer, bench: Benchmark, split: str, n_shot: int, lang: str, seed: int, batch_size: int,
             log=None) -> dict:
    from tqdm.auto import tqdm

    if lang not in PROMPTS:
        raise TunelineError(f"lang must be en or zh, not {lang!r}.")
    template = get_template("fewshot", tokenizer)
    choice_ids = choice_token_ids(tokenizer)
    pad = pad_id(tokenizer)
    rng = random.Random(seed)
    correct = {c: [] for c in CATEGORIES}
    subjects, predictions = {}, {}
    for subject, info in tqdm(sorted(bench.mapping.items()), desc="mmlu", unit="subject"):
        rows = bench.rows(subject, split)
        if not rows:
            if log:
                log.warning("%s: no %s questions for subject %s, skipped", bench.root, split, subject)
            continue
        dev = bench.rows(subject, "train")
        prompts = []
        for row in rows:
            shots = rng.sample(dev, min(n_shot, len(dev)))
            prompts.append(template.encode_prompt(build_messages(info["name"], shots, row, lang)))
        letters = predict_letters(model, prompts, choice_ids, batch_size, pad)
        hits = [letter == row["answer"].strip() for letter, row in zip(letters, rows)]
        subjects[subject] = round(100 * sum(hits) / len(hits), 2)
        correct[info["category"]] += hits
        predictions[subject] = {str(i): letter for i, letter in enumerate(letters)}
    every = [h for hits in correct.values() for h in hits]
    if not every:
        raise TunelineError(f"no {split} questions found under {bench.root}.")
    accuracy = {"Average": round(100 * sum(every) / len(every), 2)}
    accuracy.update({c: round(100 * sum(h) / len(h), 2) for c, h in correct.items() if h})
    return {"accuracy": accuracy, "subjects": subjects, "predictions": predictions, "questions": len(every)}


def main(inputs, outputs, params, log, threads=1):
    from transformers import AutoTokenizer

    set_threads(threads)
    name, split = parse_task(params["task"])
    bench = Benchmark(params["task_dir"], name)
    tokenizer = AutoTokenizer.from_pretrained(inputs["model"])
    model = load_for_inference(inputs["model"])
    result = evaluate(model, tokenizer, bench, split, params["n_shot"], params["lang"], params["seed"],
                      params["batch_size"], log)
    result = {"task": params["task"], "n_shot": params["n_shot"], "lang": params["lang"], **result}
    Path(outputs["scores"]).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for category, acc in result["accuracy"].items():
        log.info("%15s: %.2f", category, acc)
