"""Registry datasets read into one normalised record format (shared by prepare_data,
prepare_eval_data and export_gptq, each passing its own keys).

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
from .registry import DATA_EXTENSIONS, local_source, outside_dataset_dir

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
                  "system": None, "tools": None, "chosen": None, "rejected": None, "kto_tag": None}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None, "tools": None, "chosen": None, "rejected": None,
                    "kto_tag": None}
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
    try:
        return _read_file(path)
    except UnicodeDecodeError as err:
        raise TunelineError(f"{path}: not valid UTF-8 at byte {err.start} ({err.reason}). Save the file as "
                            "UTF-8.") from None


def _read_file(path: Path) -> list[dict]:
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


class Tally:
    """What became of each record of one dataset: used as written, converted (counted), or dropped
    (counted, with the reason and the first record numbers). Record numbers start at 1."""

    SHOW = 5

    def __init__(self):
        self.number = 0
        self.dropped: dict[str, list[int]] = {}
        self.converted: dict[str, list[int]] = {}

    def drop(self, why: str) -> None:
        self.dropped.setdefault(why, []).append(self.number)
        return None

    def convert(self, what: str) -> None:
        self.converted.setdefault(what, []).append(self.number)

    @classmethod
    def describe(cls, counts: dict[str, list[int]]) -> str:
        def which(numbers):
            shown = ", ".join(map(str, numbers[: cls.SHOW]))
            return f"record{'s' if len(numbers) > 1 else ''} {shown}{', …' if len(numbers) > cls.SHOW else ''}"

        return "; ".join(f"{len(n)} {why} ({which(n)})" for why, n in counts.items())


def _text(value, tally: Tally, what: str, structured: bool = False) -> str | None:
    """A text field: strings as written, missing/null as empty, numbers converted (counted);
    lists and objects are JSON text where the field is structured (tools), else the record is dropped."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, (bool, int, float)):
        tally.convert(f"{what}: number converted to text")
        return str(value).lower() if isinstance(value, bool) else str(value)
    if structured:
        return json.dumps(value, ensure_ascii=False)
    return tally.drop(f"{what} is a {type(value).__name__}, not text")


def _column(record: dict, columns: dict, role: str, tally: Tally, what: str | None = None, structured=False):
    col = columns.get(role)
    return "" if not col else _text(record.get(col), tally, what or col, structured)


def _check_columns(name: str, records: list[dict], columns: dict, required: tuple[str, ...], source: str = ""):
    present = set().union(*(r.keys() for r in records)) if records else set()
    if not records:
        raise TunelineError(f"dataset '{name}': {source or 'its data'} holds no records (the file is empty). "
                            "Fill it, or remove the dataset from `dataset`.")
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


def convert_alpaca(record: dict, columns: dict, tally: Tally) -> dict | None:
    messages = []
    history = record.get(columns["history"]) if columns.get("history") else None
    if history is not None and not isinstance(history, list):
        return tally.drop("history is not a list of [prompt, response] pairs")
    for pair in history or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            return tally.drop("history is not a list of [prompt, response] pairs")
        turn = [_text(pair[0], tally, "history"), _text(pair[1], tally, "history")]
        if None in turn:
            return None
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    parts = [_column(record, columns, k, tally) for k in ("prompt", "query")]
    if None in parts:
        return None
    prompt = "\n".join(p for p in parts if p)
    if not prompt:
        return tally.drop(f"empty prompt ({' and '.join(columns[k] for k in ('prompt', 'query') if columns.get(k))} "
                          "missing, null or empty)")
    response = record.get(columns["response"]) if columns.get("response") else None
    if response is None or isinstance(response, (list, dict)):  # LLaMA-Factory: a non-text output is unsupervised
        return tally.drop(f"{columns.get('response') or 'response'} missing, null or not text")
    response = _text(response, tally, columns["response"])
    system, tools = _column(record, columns, "system", tally), _column(record, columns, "tools", tally, structured=True)
    if system is None:
        return None
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return {"messages": messages, "system": system, "tools": tools}


def convert_sharegpt(record: dict, columns: dict, tags: dict, tally: Tally) -> dict | None:
    raw = record.get(columns["messages"])
    if not isinstance(raw, list) or not raw:
        return tally.drop(f"{columns['messages']} is missing, empty or not a list")
    if not all(isinstance(m, dict) for m in raw):
        return tally.drop(f"a message in {columns['messages']} is not an object")
    role_of = {tags.get("user_tag"): "user", tags.get("assistant_tag"): "assistant",
               tags.get("observation_tag"): "observation", tags.get("function_tag"): "function"}
    role_of.pop(None, None)
    system = _column(record, columns, "system", tally)
    if tags.get("system_tag") and raw[0].get(tags["role_tag"]) == tags["system_tag"]:
        system = _text(raw[0].get(tags["content_tag"]), tally, "system message")
        raw = raw[1:]
    if system is None:
        return None
    messages = []
    for i, msg in enumerate(raw):
        role = role_of.get(msg.get(tags["role_tag"]))
        expected = ("user", "observation") if i % 2 == 0 else ("assistant", "function")
        if role not in expected:
            return tally.drop("roles do not alternate user/assistant")
        content = _text(msg.get(tags["content_tag"]), tally, "message content")
        if content is None:
            return None
        messages.append({"role": role, "content": content})
    if len(messages) % 2 != 0:
        return tally.drop("the conversation does not end with a response")
    return {"messages": messages, "system": system,
            "tools": _column(record, columns, "tools", tally, structured=True)}


def convert_pairwise(record: dict, columns: dict, tags: dict | None, tally: Tally) -> dict | None:
    """A preference record: the prompt conversation with the chosen response as its last message,
    and the rejected response beside it. alpaca: chosen/rejected are strings; sharegpt/openai:
    message objects with an assistant role (LLaMA-Factory's layout)."""
    chosen, rejected = record.get(columns["chosen"]), record.get(columns["rejected"])
    if tags is None:  # alpaca
        if not (isinstance(chosen, str) and isinstance(rejected, str)):
            return tally.drop("chosen or rejected is not text")
        out = convert_alpaca({**record, "__chosen__": chosen}, {**columns, "response": "__chosen__"}, tally)
        rejected_text = rejected
    else:
        assistant = (tags.get("assistant_tag"), tags.get("function_tag"))
        prompt = record.get(columns["messages"])
        if not (isinstance(chosen, dict) and isinstance(rejected, dict) and isinstance(prompt, list)
                and chosen.get(tags["role_tag"]) in assistant and rejected.get(tags["role_tag"]) in assistant):
            return tally.drop("chosen or rejected is not an assistant message")
        out = convert_sharegpt({**record, columns["messages"]: prompt + [chosen]}, columns, tags, tally)
        rejected_text = _text(rejected.get(tags["content_tag"]), tally, "rejected")
    return None if out is None or rejected_text is None else {**out, "rejected": rejected_text}


def convert_tagged(record: dict, columns: dict, tags: dict | None, tally: Tally) -> dict | None:
    """A conversation with LLaMA-Factory's kto_tag: true for a desirable response, false for an undesirable one."""
    label = record.get(columns["kto_tag"])
    if not isinstance(label, bool):
        return tally.drop(f"{columns['kto_tag']} is not true or false")
    out = convert_alpaca(record, columns, tally) if tags is None else convert_sharegpt(record, columns, tags, tally)
    return None if out is None else {**out, "label": label}


def convert_text(record: dict, columns: dict, tally: Tally) -> dict | None:
    text = record.get(columns.get("prompt") or "")
    if not isinstance(text, str) or not text.strip():
        return tally.drop(f"{columns.get('prompt')} missing, empty or not text")
    return {"text": text}


def convert(name: str, entry: dict, records: list[dict], log, stage: str = "sft", source: str = "") -> list[dict]:
    from . import stages

    formatting = entry.get("formatting", "alpaca")
    ranking = bool(entry.get("ranking"))
    kind = stages.get(stage).RECORD
    if ranking != (kind == "pair"):
        pair_stages = " or ".join(s for s in stages.STAGES if stages.get(s).RECORD == "pair")
        raise TunelineError(
            f"dataset '{name}' is a preference dataset (ranking: true); stage {stage} cannot use it: set stage: "
            f"{pair_stages}." if ranking else
            f"dataset '{name}' is not a preference dataset; stage {stage} needs pairs: register one with "
            f"ranking: true and columns chosen/rejected (e.g. dpo_en_demo)."
        )
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise TunelineError(f"dataset '{name}': unknown formatting '{formatting}' (alpaca, sharegpt or openai).")
    columns = _mapping(ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS, entry.get("columns"))
    tags = None if formatting == "alpaca" else _mapping(TAGS, entry.get("tags"))
    if kind == "text":
        if formatting != "alpaca":
            raise TunelineError(f"dataset '{name}': stage {stage} reads raw text from columns.prompt; use the "
                                f"alpaca formatting with columns {{\"prompt\": \"text\"}} (as c4_demo does).")
        required, one = ("prompt",), lambda r, t: convert_text(r, columns, t)
    elif ranking:
        for role in ("chosen", "rejected"):
            if not columns.get(role):
                raise TunelineError(f"dataset '{name}' (ranking: true) must name columns.{role} in dataset_info.json.")
        required = ("chosen", "rejected") + (("prompt",) if tags is None else ("messages",))
        one = lambda r, t: convert_pairwise(r, columns, tags, t)
    elif kind == "tagged":
        if not columns.get("kto_tag"):
            raise TunelineError(f"dataset '{name}': stage {stage} needs a desirable/undesirable label per record: "
                                "name its boolean column as columns.kto_tag in dataset_info.json (as kto_en_demo does).")
        required = ("kto_tag",) + (("prompt", "response") if tags is None else ("messages",))
        one = lambda r, t: convert_tagged(r, columns, tags, t)
    elif tags is None:
        required, one = ("prompt", "response"), lambda r, t: convert_alpaca(r, columns, t)
    else:
        required, one = ("messages",), lambda r, t: convert_sharegpt(r, columns, tags, t)
    _check_columns(name, records, columns, required, source)
    tally, kept = Tally(), []
    for number, record in enumerate(records, start=1):
        tally.number = number
        out = one(record, tally)
        if out is not None:
            kept.append(dict(out, dataset=name))
    if tally.converted:
        log.warning("dataset %s: converted values in %d records: %s", name,
                    len({n for ns in tally.converted.values() for n in ns}), Tally.describe(tally.converted))
    dropped = len(records) - len(kept)
    if dropped:
        log.warning("dataset %s: dropped %d of %d records: %s", name, dropped, len(records), Tally.describe(tally.dropped))
    if dropped * 2 > len(records):
        raise TunelineError(f"dataset '{name}' ({source or 'its data'}): {dropped} of {len(records)} records are invalid "
                            f"({Tally.describe(tally.dropped)}). Fix the data, or its `columns`/`formatting` in "
                            "dataset_info.json.")
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


COLLECT_KEYS = ("dataset_dir", "stage", "max_samples", "identity_name", "identity_author")


def collect_for(params: dict, log, entries: dict | None = None) -> tuple[list[dict], Counter]:
    """`collect` with the keys taken from a rule's config slice (which must hold COLLECT_KEYS)."""
    return collect(params["entries"] if entries is None else entries, log, **{k: params[k] for k in COLLECT_KEYS})


def collect(entries: dict, log, *, dataset_dir: str, stage: str, max_samples: int | None, identity_name: str,
            identity_author: str) -> tuple[list[dict], Counter]:
    """Read, convert, cut (max_samples), fill placeholders and deduplicate the named datasets."""
    stats = Counter()
    examples = []
    for note in outside_dataset_dir(dataset_dir, entries):
        log.info("%s", note)
    for name, entry in entries.items():
        records = load_records(name, entry, dataset_dir, log)
        converted = convert(name, entry, records, log, stage, str(local_source(dataset_dir, entry) or ""))
        stats["read"] += len(records)
        stats["invalid"] += len(records) - len(converted)
        if max_samples and len(converted) > max_samples:
            log.info("dataset %s: max_samples=%d keeps the first %d of %d examples",
                     name, max_samples, max_samples, len(converted))
            stats["cut_by_max_samples"] += len(converted) - max_samples
            converted = converted[:max_samples]
        examples.extend(converted)
    replacements = {"name": identity_name, "author": identity_author}
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
