"""Rule `prepare_data`: registry datasets -> one normalised messages format.

Reads LLaMA-Factory's dataset_info.json schema (alpaca and sharegpt formatting, `columns` and
`tags`, system/history/tools columns, OpenAI-style role/content messages) from json, jsonl, csv
and parquet files. Output, one JSON object per line in train.jsonl / validation.jsonl:

    {"messages": [{"role": "user"|"assistant"|"observation"|"function", "content": str}, ...],
     "system": str, "tools": str, "dataset": name}

The last message is the response. By `stage`:

- dpo (datasets with `ranking: true`): the same, with the chosen response as the last message,
  plus `"rejected": str`, the rejected response to the same prompt;
- pt: `{"text": str, "dataset": name}`, the `columns.prompt` column of each record (LLaMA-Factory's
  pre-training datasets register `{"prompt": "text"}`; a .txt file is one text per line).

Every example that is dropped, cut or merged is counted in the log and in stats.json.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import TunelineError
from .jsonl import write_jsonl
from .registry import DATA_EXTENSIONS, local_source

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "tools": None, "chosen": None, "rejected": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None, "chosen": None, "rejected": None}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
MEDIA_COLUMNS = ("images", "videos", "audios")


# ------------------------------------------------------------------ reading files

def read_json_records(path: Path) -> list[dict]:
    """A JSON array, or JSON lines; errors name the file and line."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise TunelineError(
                f"{path}, line {err.lineno}, column {err.colno}: malformed JSON ({err.msg}). Fix the file."
            ) from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise TunelineError(
                    f"{path}, line {lineno}, column {err.colno}: malformed JSON line ({err.msg}). Fix the file."
                ) from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise TunelineError(f"{path}: record {bad} is {type(records[bad]).__name__}, expected a JSON object.")
    return records


def read_file(path: Path) -> list[dict]:
    ext = path.suffix.lstrip(".").lower()
    kind = DATA_EXTENSIONS.get(ext)
    if kind is None:
        raise TunelineError(f"{path}: unsupported data file type '.{ext}' (use {', '.join(DATA_EXTENSIONS)}).")
    if kind == "json":
        return read_json_records(path)
    if kind == "text":
        return [{"text": line} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=None, keep_in_memory=True)
    return ds.to_list()


def load_records(name: str, entry: dict, dataset_dir: str, log) -> list[dict]:
    src = local_source(dataset_dir, entry)
    if src is None:
        return load_hub(name, entry)
    files = sorted(p for p in src.iterdir() if p.is_file()) if src.is_dir() else [src]
    records = []
    for f in files:
        records.extend(read_file(f))
    log.info("dataset %s: read %d examples from %s", name, len(records), src)
    return records


def load_hub(name: str, entry: dict) -> list[dict]:
    import datasets

    repo = next(entry[k] for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name") if entry.get(k))
    try:
        ds = datasets.load_dataset(repo, name=entry.get("subset"), data_dir=entry.get("folder"),
                                   split=entry.get("split", "train"))
    except Exception as err:
        raise TunelineError(
            f"dataset '{name}' comes from the hub ('{repo}') and could not be loaded: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}. Without hub access, download it to a file and "
            f"register it with file_name."
        ) from None
    return ds.to_list()


# ------------------------------------------------------------------ converting

def _mapping(defaults: dict, given: dict | None) -> dict:
    # LLaMA-Factory's rule: a given `columns`/`tags` object replaces the defaults wholesale
    # (keys it does not name become None). We keep that so registries behave as they do there.
    return dict(defaults) if given is None else {k: given.get(k) for k in set(defaults) | set(given)}


def _text(value) -> str:
    return "" if value is None else value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _check_columns(name: str, records: list[dict], columns: dict, required: tuple[str, ...]):
    present = set().union(*(r.keys() for r in records)) if records else set()
    for role in required:
        col = columns.get(role)
        if col and col not in present:
            raise TunelineError(
                f"dataset '{name}': column '{col}' (columns.{role}) is missing from every record; the records "
                f"have {', '.join(sorted(present))}. Fix `columns` in dataset_info.json."
            )
    for role in MEDIA_COLUMNS:
        if columns.get(role):
            raise TunelineError(f"dataset '{name}' has {role}: multimodal data is not supported by Tuneline yet.")


def convert_alpaca(record: dict, columns: dict) -> dict | None:
    messages = []
    history = record.get(columns["history"]) if columns.get("history") else None
    for pair in history or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            return None
        messages += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
    parts = [record.get(columns[k]) for k in ("prompt", "query") if columns.get(k)]
    prompt = "\n".join(p for p in parts if isinstance(p, str) and p)
    response = record.get(columns["response"]) if columns.get("response") else None
    if not isinstance(response, str):  # LLaMA-Factory: a non-string output is unsupervised
        return None
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {
        "messages": messages,
        "system": _text(record.get(columns["system"])) if columns.get("system") else "",
        "tools": _text(record.get(columns["tools"])) if columns.get("tools") else "",
    }


def convert_sharegpt(record: dict, columns: dict, tags: dict) -> dict | None:
    raw = record.get(columns["messages"])
    if not isinstance(raw, list) or not raw:
        return None
    role_of = {tags.get("user_tag"): "user", tags.get("assistant_tag"): "assistant",
               tags.get("observation_tag"): "observation", tags.get("function_tag"): "function"}
    role_of.pop(None, None)
    system = _text(record.get(columns["system"])) if columns.get("system") else ""
    if tags.get("system_tag") and raw[0].get(tags["role_tag"]) == tags["system_tag"]:
        system = _text(raw[0].get(tags["content_tag"]))
        raw = raw[1:]
    messages = []
    for i, msg in enumerate(raw):
        role = role_of.get(msg.get(tags["role_tag"]))
        expected = ("user", "observation") if i % 2 == 0 else ("assistant", "function")
        if role not in expected:
            return None
        messages.append({"role": role, "content": _text(msg.get(tags["content_tag"]))})
    if len(messages) % 2 != 0:
        return None
    return {"messages": messages, "system": system,
            "tools": _text(record.get(columns["tools"])) if columns.get("tools") else ""}


def convert_pairwise(record: dict, columns: dict, tags: dict | None) -> dict | None:
    """A preference record: the prompt conversation with the chosen response as its last message,
    and the rejected response beside it. alpaca: chosen/rejected are strings; sharegpt/openai:
    message objects with an assistant role (LLaMA-Factory's layout)."""
    chosen, rejected = record.get(columns["chosen"]), record.get(columns["rejected"])
    if tags is None:  # alpaca
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            return None
        out = convert_alpaca({**record, "__chosen__": chosen}, {**columns, "response": "__chosen__"})
        rejected_text = rejected
    else:
        assistant = (tags.get("assistant_tag"), tags.get("function_tag"))
        prompt = record.get(columns["messages"])
        if not (isinstance(chosen, dict) and isinstance(rejected, dict) and isinstance(prompt, list)
                and chosen.get(tags["role_tag"]) in assistant and rejected.get(tags["role_tag"]) in assistant):
            return None
        out = convert_sharegpt({**record, columns["messages"]: prompt + [chosen]}, columns, tags)
        rejected_text = _text(rejected.get(tags["content_tag"]))
    return None if out is None else {**out, "rejected": rejected_text}


def convert_text(record: dict, columns: dict) -> dict | None:
    text = record.get(columns.get("prompt") or "")
    return {"text": text} if isinstance(text, str) and text.strip() else None


def convert(name: str, entry: dict, records: list[dict], log, stage: str = "sft") -> list[dict]:
    formatting = entry.get("formatting", "alpaca")
    ranking = bool(entry.get("ranking"))
    if ranking != (stage == "dpo"):
        raise TunelineError(
            f"dataset '{name}' is a preference dataset (ranking: true); stage {stage} cannot use it: set stage: dpo."
            if ranking else
            f"dataset '{name}' is not a preference dataset; stage dpo needs pairs: register one with "
            f"ranking: true and columns chosen/rejected (e.g. dpo_en_demo)."
        )
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise TunelineError(f"dataset '{name}': unknown formatting '{formatting}' (alpaca, sharegpt or openai).")
    columns = _mapping(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS, entry.get("columns"))
    tags = None if formatting == "alpaca" else _mapping(TAGS, entry.get("tags"))
    if stage == "pt":
        if formatting != "alpaca":
            raise TunelineError(f"dataset '{name}': stage pt reads raw text from columns.prompt; use the "
                                f"alpaca formatting with columns {{\"prompt\": \"text\"}} (as c4_demo does).")
        _check_columns(name, records, columns, ("prompt",))
        out, kind = [convert_text(r, columns) for r in records], "texts (empty or not a string)"
    elif ranking:
        for role in ("chosen", "rejected"):
            if not columns.get(role):
                raise TunelineError(f"dataset '{name}' (ranking: true) must name columns.{role} in dataset_info.json.")
        _check_columns(name, records, columns, ("chosen", "rejected") + (("prompt",) if tags is None else ("messages",)))
        out, kind = [convert_pairwise(r, columns, tags) for r in records], f"{formatting} preference pairs"
    elif tags is None:
        _check_columns(name, records, columns, ("prompt", "response"))
        out, kind = [convert_alpaca(r, columns) for r in records], "alpaca conversations"
    else:
        _check_columns(name, records, columns, ("messages",))
        out, kind = [convert_sharegpt(r, columns, tags) for r in records], f"{formatting} conversations"
    kept = [dict(r, dataset=name) for r in out if r is not None]
    if len(kept) < len(records):
        why = "" if stage == "pt" else " (roles must alternate user/assistant and end with a response)"
        log.warning("dataset %s: dropped %d of %d examples that are not valid %s%s",
                    name, len(records) - len(kept), len(records), kind, why)
    return kept


def fill_placeholders(example: dict, replacements: dict[str, str]) -> dict:
    def fill(text: str) -> str:
        for key, value in replacements.items():
            text = text.replace("{{" + key + "}}", value)
        return text

    if "text" in example:  # stage pt
        return {**example, "text": fill(example["text"])}
    filled = {**example, "system": fill(example["system"]),
              "messages": [{**m, "content": fill(m["content"])} for m in example["messages"]]}
    if "rejected" in example:
        filled["rejected"] = fill(example["rejected"])
    return filled


def deduplicate(examples: list[dict]) -> tuple[list[dict], int]:
    seen, kept = set(), []
    for ex in examples:
        key = json.dumps({k: v for k, v in ex.items() if k != "dataset"}, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept, len(examples) - len(kept)


def split(examples: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    if not val_size:
        return examples, []
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if n_val >= len(examples):
        raise TunelineError(
            f"val_size={val_size} asks for {n_val} validation examples but only {len(examples)} remain; lower it."
        )
    import datasets

    parts = datasets.Dataset.from_list(examples).train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"].to_list(), parts["test"].to_list()


def collect(entries: dict, params: dict, log) -> tuple[list[dict], Counter]:
    """Read, convert, cut (max_samples), fill placeholders and deduplicate the named datasets."""
    stats = Counter()
    examples = []
    for name, entry in entries.items():
        records = load_records(name, entry, params["dataset_dir"], log)
        converted = convert(name, entry, records, log, params["stage"])
        stats["read"] += len(records)
        stats["invalid"] += len(records) - len(converted)
        if params["max_samples"] and len(converted) > params["max_samples"]:
            log.info("dataset %s: max_samples=%d keeps the first %d of %d examples",
                     name, params["max_samples"], params["max_samples"], len(converted))
            stats["cut_by_max_samples"] += len(converted) - params["max_samples"]
            converted = converted[: params["max_samples"]]
        examples.extend(converted)
    replacements = {"name": params["identity_name"], "author": params["identity_author"]}
    examples = [fill_placeholders(ex, replacements) for ex in examples]
    examples, stats["duplicates"] = deduplicate(examples)
    if stats["duplicates"]:
        log.info("removed %d exact duplicate examples", stats["duplicates"])
    if not examples:
        raise TunelineError(
            f"no valid examples left in dataset(s) {', '.join(entries)} after conversion and "
            f"filtering ({dict(stats)}). Check the registry's formatting/columns/tags for these datasets."
        )
    return examples, stats


def write_splits(out_dir: str, train: list[dict], val: list[dict], stats: Counter, log) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "validation.jsonl", val)
    stats.update(train=len(train), validation=len(val))
    (out / "stats.json").write_text(json.dumps(dict(stats), indent=2) + "\n")
    log.info("wrote %d training and %d validation examples to %s", len(train), len(val), out)
    return {"stats": dict(stats)}


def main(inputs, outputs, params, log, threads=1):
    examples, stats = collect(params["entries"], params, log)
    train, val = split(examples, params["val_size"], params["seed"])
    return write_splits(outputs["data"], train, val, stats, log)
