"""The config schema: the one place each key is defined, and what is derived from it.

Imported by the Snakefile, so it must stay light (yaml and the standard library only).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from pathlib import Path

import yaml

from .errors import TunelineError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


@lru_cache(maxsize=None)
def load_schema(path: str | Path = SCHEMA_PATH) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: keeps dry-runs fast
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=loader)


def keys(schema: dict | None = None) -> dict[str, dict]:
    return (schema or load_schema())["properties"]


def types_of(spec: dict) -> list[str]:
    """A key's JSON types as a list (the schema writes one type as a string)."""
    return spec.get("type") if isinstance(spec.get("type"), list) else [spec.get("type")]


def defaults(schema: dict | None = None) -> dict:
    return {k: spec.get("default") for k, spec in keys(schema).items()}


def adopt_foreign_keys(config: dict, schema: dict | None = None) -> list[str]:
    """LLaMA-Factory's keys that are not Tuneline keys, and well-known foreign names (schema sections
    `llamafactory` and `foreign_keys`): aliases renamed, accepted ones removed, each with a note for the
    log; refused ones raise, saying what to use instead. Returns the notes."""
    schema = schema or load_schema()
    notes, refused = [], []
    for section, origin in (("llamafactory", "LLaMA-Factory's"), ("foreign_keys", None)):
        for key, rule in (schema.get(section) or {}).items():
            if key not in config or key in keys(schema):
                continue
            value = config.pop(key)
            given = yaml.safe_load(value) if isinstance(value, str) else value  # --config passes strings
            if "alias" in rule:
                target = rule["alias"]
                if rule.get("invert") and isinstance(given, bool):
                    value = not given
                if isinstance(value, list) and keys(schema)[target].get("type") == "string":
                    value = ",".join(map(str, value))
                if target in config and config[target] != value:
                    refused.append(f"`{key}` and `{target}` are both set, to different values: keep `{target}` only")
                    continue
                config[target] = value
                notes.append(f"config key `{key}` is read as `{target}`" + (" (negated)" if rule.get("invert") else "")
                             + f" = {value!r}")
            elif "accept" in rule and ("accept_values" not in rule or given in rule["accept_values"]):
                notes.append(f"{origin or 'the'} key `{key}` is accepted and not used: {rule['accept']}")
            else:
                what = (f"{origin} `{key}`" + (f" = {value!r}" if "accept_values" in rule else "")
                        + " is not supported by Tuneline yet") if origin else f"`{key}` is not a Tuneline key"
                refused.append(f"{what}: {rule['refuse']}")
    if refused:
        raise TunelineError("; ".join(refused) + " (docs/config.md lists every key).")
    return notes


def load_config_file(path: str | Path) -> dict:
    """A config file as `snakemake --configfile` reads it, with errors that name the file and line.

    Snakemake loads `--configfile` in its own command line, before any workflow code runs, and
    says only "Config file is not valid JSON or YAML"; `tuneline run` and `tuneline check` call
    this first so the user learns where."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TunelineError(f"config file {path} does not exist.") from None
    except UnicodeDecodeError as err:
        raise TunelineError(f"config file {path} is not UTF-8 text (byte {err.start}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        tab = " Indent with spaces: YAML does not allow tabs." if "'\\t'" in str(err) else ""
        raise TunelineError(f"{where}: the config file is not valid YAML ({problem}).{tab}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunelineError(f"{path}: a config file is a mapping of keys (`learning_rate: 1.0e-4`, one per line), "
                            f"not a {type(data).__name__}.")
    return data


def check_config_file(path: str | Path, schema: dict | None = None) -> dict:
    """Every check the workflow runs on a config, applied to one file on its own."""
    config = load_config_file(path)
    try:
        adopt_foreign_keys(config, schema)
        check_unknown_keys(config, schema)
        coerce_cli_values(config, schema)
        check_values(config, schema)
    except TunelineError as err:
        raise TunelineError(f"{path}: {err}") from None
    return config


def check_unknown_keys(config: dict, schema: dict | None = None) -> None:
    """Reject keys the schema does not define, naming the nearest valid key."""
    known = keys(schema)
    problems = []
    for key in config:
        if key in known:
            continue
        near = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
        hint = f" (did you mean {near[0]}?)" if near else ""
        problems.append(f"unknown config key '{key}'{hint}")
    if problems:
        raise TunelineError(
            "; ".join(problems)
            + ". Every key is listed in docs/config.md (generated from config/schema.yaml)."
        )


def coerce_cli_values(config: dict, schema: dict | None = None) -> None:
    """`--config train_on_prompt=true` arrives as the string 'true': read such strings as YAML
    (true, false, null, numbers) for keys whose type is not a string. Config files too: PyYAML
    reads `learning_rate: 5e-5` as a string, and it is taken as the number it means."""
    json_types = {bool: "boolean", int: "integer", float: "number", type(None): "null"}
    for key, spec in keys(schema).items():
        value = config.get(key)
        types = types_of(spec)
        if not isinstance(value, str) or "string" in types:
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, str) and "number" in types:
            try:  # YAML 1.1 reads 5e-5 (no dot) as a string; LLaMA-Factory users write it
                parsed = float(parsed)
            except ValueError:
                pass
        kind = json_types.get(type(parsed))
        if kind in types or (kind == "integer" and "number" in types):
            config[key] = parsed


def value_problems(config: dict, schema: dict | None = None) -> list[tuple[str | None, str]]:
    """[(key, message)] for each value of the wrong type or not allowed (the board shows each beside
    its field); messages start with the key's name."""
    from jsonschema import Draft202012Validator

    schema = schema or load_schema()
    problems = []
    for key, spec in keys(schema).items():  # LLaMA-Factory values Tuneline knows and does not run
        reason = spec.get("unsupported", {}).get(config.get(key)) if isinstance(config.get(key), str) else None
        if reason:
            allowed = ", ".join("null" if v is None else str(v) for v in spec["enum"])
            problems.append((key, f"config key '{key}' = {config[key]!r} is not supported: "
                                  f"{' '.join(reason.split())} Allowed: {allowed}."))
    if problems:
        return problems
    for err in sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.path)):
        key = err.path[0] if err.path else None
        spec = keys(schema).get(key, {})
        hint = ""
        if "enum" in spec and len(spec["enum"]) == 1:
            hint = " " + " ".join(str(spec.get("description", "")).split())
        elif "enum" in spec:
            hint = " Allowed: " + ", ".join("null" if v is None else str(v) for v in spec["enum"]) + "."
        problems.append((key, f"config key '{key}' = {config.get(key)!r}: {err.message}.{hint}"))
    return problems


def check_values(config: dict, schema: dict | None = None) -> None:
    """Types and allowed values, with messages that start with the key's name."""
    problems = value_problems(config, schema)
    if problems:
        raise TunelineError(" ".join(message for _, message in problems) + " See docs/config.md.")


def check_files(config: dict) -> None:
    """Keys that name a file must name one that exists (checked before any job)."""
    import os

    path = config.get("deepspeed")
    if path and not os.path.isfile(os.path.expanduser(path)):
        raise TunelineError(f"config key 'deepspeed' = {path!r}: no such file. Give the path of a DeepSpeed JSON "
                            "config (relative to the working directory), or leave the key unset.")
    adapter = config.get("adapter_name_or_path")
    if adapter:
        if "," in str(adapter):
            raise TunelineError(f"config key 'adapter_name_or_path' = {adapter!r}: Tuneline takes one adapter; merge "
                                "several with LLaMA-Factory first, or give the one to use.")
        if not os.path.isfile(os.path.join(os.path.expanduser(adapter), "adapter_config.json")):
            raise TunelineError(f"config key 'adapter_name_or_path' = {adapter!r}: no adapter_config.json there. Give "
                                "the local folder a PEFT adapter was saved to (hub adapters: download them first).")
    if isinstance(config.get("resume_from_checkpoint"), str):
        check_checkpoint(config["resume_from_checkpoint"])


def check_checkpoint(path) -> None:
    import os

    if not os.path.isfile(os.path.join(os.path.expanduser(path), "trainer_state.json")):
        raise TunelineError(f"config key 'resume_from_checkpoint' = {path!r}: no trainer_state.json there. Give a "
                            "checkpoint-N folder that a Trainer saved (LLaMA-Factory: <output_dir>/checkpoint-N), or "
                            "leave the key unset: an interrupted run of the same config resumes by itself.")


def absolute_paths(config: dict, base: str, schema: dict | None = None) -> list[str]:
    """Make the config's paths (schema `path:`) absolute against `base`, the folder snakemake was started
    in, before an output_dir run moves into its own folder. -> the keys changed."""
    import os

    changed = []
    for key, spec in keys(schema).items():
        value = config.get(key)
        if not spec.get("path") or not isinstance(value, str) or not value:
            continue
        path = os.path.expanduser(value)
        if spec["path"] == "local" and not os.path.exists(os.path.join(base, path)):
            continue  # a hub ID
        if not os.path.isabs(path):
            config[key] = os.path.normpath(os.path.join(base, path))
            changed.append(key)
    return changed


def rule_keys(rule: str, schema: dict | None = None, config: dict | None = None) -> list[str]:
    """The keys whose schema entry names `rule` in `rules`, plus those that name it in `rules_when`
    ({rule: other key}) when that other key is set in `config` (e.g. base_model reads cutoff_len
    only when rope_scaling is set: other runs do not rebuild the base model for a new cutoff_len)."""
    full = {**defaults(schema), **(config or {})}
    return sorted(k for k, spec in keys(schema).items()
                  if rule in spec.get("rules", [])
                  or (rule in spec.get("rules_when", {}) and full.get(spec["rules_when"][rule]) is not None))


def rule_params(config: dict, rule: str, schema: dict | None = None) -> dict:
    """The slice of the config that `rule` reads: exactly the keys whose schema entry names it."""
    full = {**defaults(schema), **config}
    return {k: full[k] for k in rule_keys(rule, schema, config)}


def rule_resources(config: dict, rule: str, schema: dict | None = None) -> dict:
    """The Snakemake resources of `rule`, from the keys whose schema entry lists it in
    `resources_of` (each key names its `resource`). Resources never trigger reruns."""
    import os

    full = {**defaults(schema), **config}
    resources = {}
    for key, spec in keys(schema).items():
        if rule not in spec.get("resources_of", []) and "*" not in spec.get("resources_of", []):
            continue
        value = full[key]
        gpu_key = key.startswith(("gpu", "slurm_gpu"))
        if gpu_key and not full["gpus"]:
            continue  # a CPU-only run: no GPU request, no GPU partition
        if key == "gpus" and rule == "train":
            value = max(value, full["nproc_per_node"])
        if spec["resource"] == "cpus_per_task" and value is None:
            value = os.cpu_count() or 1
        if value is not None:
            resources[spec["resource"]] = value
    return resources


def launch_settings(config: dict, rule: str, schema: dict | None = None) -> dict:
    """Keys that say how `rule` is launched (`launch_of`, e.g. torchrun's master address):
    handed to the job without being params, so changing them reruns nothing."""
    full = {**defaults(schema), **config}
    return {k: full[k] for k, spec in keys(schema).items() if rule in spec.get("launch_of", [])}


def markdown_table(schema: dict | None = None) -> str:
    """The key table for docs/config.md and the README."""

    def fmt_type(spec):
        types = types_of(spec)
        return " or ".join(x for x in types if x != "null") + (", nullable" if "null" in types else "")

    def fmt_default(v):
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        return f"`{v}`"

    rows = [
        "| key | type | default | allowed | read by | description |",
        "|---|---|---|---|---|---|",
    ]
    for key, spec in keys(schema).items():
        allowed = ""
        if "enum" in spec:
            allowed = ", ".join("null" if v is None else str(v) for v in spec["enum"])
        else:
            bounds = []
            for word, sym in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤")):
                if word in spec:
                    bounds.append(f"{sym} {spec[word]}")
            allowed = ", ".join(bounds)
        rules = ", ".join(spec.get("rules", []) + [f"{r} (when {k} is set)" for r, k in spec.get("rules_when", {}).items()])
        if spec.get("resources_of"):
            rules = "resources of " + (", ".join(spec["resources_of"]).replace("*", "every rule"))
        elif spec.get("launch_of"):
            rules = "launch of " + ", ".join(spec["launch_of"])
        elif spec.get("workflow"):
            rules = "the Snakefile (`workdir:`)"
        rules = rules or "`tuneline chat`"
        desc = " ".join(str(spec.get("description", "")).split()).replace("|", "\\|")
        rows.append(
            f"| `{key}` | {fmt_type(spec)} | {fmt_default(spec.get('default'))} | {allowed} | {rules} | {desc} |"
        )
    return "\n".join(rows) + "\n"


def foreign_keys_table(schema: dict | None = None) -> str:
    """LLaMA-Factory's other keys and well-known foreign names: what Tuneline does with each."""
    schema = schema or load_schema()
    rows = ["| key | from | what Tuneline does |", "|---|---|---|"]
    for section, origin in (("llamafactory", "LLaMA-Factory"), ("foreign_keys", "PEFT / HF / TRL configs")):
        for key, rule in (schema.get(section) or {}).items():
            if "alias" in rule:
                what = f"read as `{rule['alias']}`" + (" (negated)" if rule.get("invert") else "")
            elif "accept" in rule:
                only = (" (values " + ", ".join("null" if v is None else str(v).lower() for v in rule["accept_values"])
                        + f"; others refused: {rule['refuse']})") if "accept_values" in rule else ""
                what = f"accepted, not used: {rule['accept']}{only}"
            else:
                what = f"refused: {rule['refuse']}"
            rows.append(f"| `{key}` | {origin} | {what.replace('|', chr(92) + '|')} |")
    return "\n".join(rows) + "\n"


DOCS_START, DOCS_END = "<!-- keys:start (generated by `tuneline keys --write`) -->", "<!-- keys:end -->"


def docs_block() -> str:
    return f"{DOCS_START}\n{markdown_table()}{DOCS_END}"


def write_docs(root: Path = SCHEMA_PATH.parent.parent) -> list[Path]:
    """Regenerate docs/config.md and the key table inside README.md."""
    page = root / "docs" / "config.md"
    page.parent.mkdir(exist_ok=True)
    page.write_text(
        "# Config keys\n\nGenerated from `config/schema.yaml`; each rule receives exactly the keys that name it, "
        "so changing a key reruns those rules and what depends on them.\n\n" + docs_block() + "\n\n"
        "## LLaMA-Factory's other keys\n\nA LLaMA-Factory config works as it is: each of its keys that is not a "
        "Tuneline key above is read as one (with a log line), accepted with a log line saying what the pipeline "
        "does instead, or refused with what to use instead. Any other unknown key is a typo and is rejected with "
        "the nearest valid key.\n\n" + foreign_keys_table()
    )
    written = [page]
    readme = root / "README.md"
    if readme.is_file():
        text = readme.read_text()
        if DOCS_START in text and DOCS_END in text:
            head, rest = text.split(DOCS_START, 1)
            tail = rest.split(DOCS_END, 1)[1]
            readme.write_text(head + docs_block() + tail)
            written.append(readme)
    return written
