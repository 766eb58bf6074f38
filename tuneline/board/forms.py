"""The board's Train form, generated from config/schema.yaml, and the config a submitted form means."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import config as cfg
from ..generation import GENERATION_KEYS

# LLaMA Board's groups; the schema's own sections (its `# ---- name` comments) map onto them
SECTION_GROUP = {"model": "model", "data": "data", "tokenize": "data", "method": "method", "training": "training",
                 "multi-process training": "training", "cluster resources": "training", "merge": "export",
                 "export": "export", "generation (predict, tuneline chat)": "evaluation",
                 "multiple-choice benchmarks": "evaluation"}
GROUPS = ("model", "method", "data", "training", "LoRA", "RLHF", "evaluation", "export")
LORA = re.compile(r"^(lora_|loraplus_|use_dora|use_rslora|additional_target)")
RLHF = re.compile(r"^(pref_|kto_|simpo_|reward_|num_generations|max_completion_length)")


# the Chat tab's generation keys: predict's, less num_beams (beam search cannot stream its reply)
CHAT_KEYS = tuple(key for key in GENERATION_KEYS if key != "num_beams")


@dataclass
class Field:
    key: str
    group: str
    kind: str  # "bool" (on/off; three states, unset too, when nullable), "choice", "number", "list" (comma-separated), "text"
    choices: list
    value: object  # as the workflow merges it
    default: object  # the schema's own default
    nullable: bool
    help: str


def sections(schema_path: Path = cfg.SCHEMA_PATH) -> dict[str, str]:
    """key -> the schema section it is written under (the `# ---- name` comment lines)."""
    found, section = {}, ""
    for line in Path(schema_path).read_text().splitlines():
        header = re.match(r"^\s*# -{8,}\s*(.+?)\s*$", line)
        if header:
            section = header.group(1)
        key = re.match(r"^  ([a-z_0-9]+):", line)
        if key:
            found[key.group(1)] = section
    return found


def group_of(key: str, section: str) -> str:
    if section == "method" and LORA.match(key):
        return "LoRA"
    if section == "method" and RLHF.match(key):
        return "RLHF"
    return SECTION_GROUP.get(section, "training")


def workflow_config() -> dict:
    """The workflow's defaults: the schema's, then config/config.yaml's (what snakemake starts from)."""
    shipped = yaml.safe_load((cfg.SCHEMA_PATH.parent / "config.yaml").read_text()) or {}
    return {**cfg.defaults(), **shipped}


def fields(loaded: dict | None = None) -> list[Field]:
    """Every key a rule or the Snakefile reads, in LLaMA Board's groups, with the merged value."""
    base = {**workflow_config(), **(loaded or {})}
    where = sections()
    out = []
    for key, spec in cfg.keys().items():
        types = cfg.types_of(spec)
        nullable = "null" in types
        if "boolean" in types and "string" not in types:  # on/off, and unset when null is allowed
            kind, choices = "bool", ([None] if nullable else []) + [True, False]
        elif "enum" in spec:
            kind, choices = "choice", list(spec["enum"])
        elif {"integer", "number"} & set(types):
            kind, choices = "number", []
        elif "array" in types:
            kind, choices = "list", list(spec.get("items", {}).get("enum", []))
        else:
            kind, choices = "text", []
        value = ", ".join(map(str, base[key])) if kind == "list" and isinstance(base.get(key), list) else base.get(key)
        out.append(Field(key, group_of(key, where.get(key, "")), kind, choices, value, spec.get("default"),
                         nullable, " ".join(str(spec.get("description", "")).split())))
    return sorted(out, key=lambda f: GROUPS.index(f.group))


def from_form(form: dict[str, str], base: dict | None = None) -> tuple[dict, list[tuple[str | None, str]]]:
    """The keys whose submitted value differs from `base` (the workflow's merged defaults), typed as the
    schema says, and the problems (key, message) the workflow's own checks find in them."""
    base = base if base is not None else workflow_config()
    known = cfg.keys()
    given = {}
    for key, text in form.items():
        if key not in known:
            continue
        types = cfg.types_of(known[key])
        if "array" in types:  # a list field is comma-separated
            given[key] = [item.strip() for item in text.split(",") if item.strip()]
        else:
            given[key] = None if text == "" and ("null" in types or "string" not in types) else text
    cfg.coerce_cli_values(given)
    changed = {k: v for k, v in given.items() if v != base.get(k)}
    problems = cfg.value_problems({**base, **changed})
    try:
        cfg.check_files(changed)
    except cfg.TunelineError as err:
        problems.append((None, str(err)))
    return changed, problems


def to_yaml(changed: dict) -> str:
    return yaml.safe_dump(changed, sort_keys=True, allow_unicode=True) if changed else "{}\n"


def chat_generation(form: dict[str, str]) -> tuple[dict, list[tuple[str | None, str]]]:
    """The Chat tab's generation keys: the workflow's values with the submitted ones, typed and checked."""
    base = workflow_config()
    changed, problems = from_form({k: v for k, v in form.items() if k in CHAT_KEYS}, base)
    return {**{k: base[k] for k in CHAT_KEYS}, **changed}, problems
