"""`tuneline bench`: rerun one config N times from scratch and say how much the runs agree.

Each run gets a fresh folder (<out>/run-<i>) and the whole DAG up to the target. From every run
it reads Snakemake's own `benchmark:` records (results/benchmarks/*.tsv: seconds, max RSS), the
training loss (results/adapter/train_report.json) and the evaluation scores
(results/eval/summary.json), then prints mean and spread of each, and whether every artifact
folder came out identical (provenance records and timing fields aside).
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .config import defaults
from .errors import TunelineError

REPO = Path(__file__).resolve().parent.parent
# config keys naming local paths: made absolute, since each run works in a folder of its own
PATH_KEYS = ("model_name_or_path", "dataset_dir", "task_dir", "deepspeed")
# fields that hold timings or dates: left out when artifacts are compared
VOLATILE = re.compile(r"runtime|per_second|seconds|_time$|^time|date|created|duration|flos")


def run_config(config_file: Path) -> dict:
    """The user's config over the shipped defaults, with local paths made absolute."""
    shipped = yaml.safe_load((REPO / "config" / "config.yaml").read_text()) or {}
    try:
        user = yaml.safe_load(config_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise TunelineError(f"{config_file}: cannot read the config ({err})") from None
    cfg = {**defaults(), **shipped, **user}
    for key in PATH_KEYS:
        value = cfg.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            cfg[key] = str(Path(value).expanduser().resolve())
    return {k: v for k, v in cfg.items() if k in user or k in shipped or k in PATH_KEYS}


def read_benchmarks(results: Path) -> dict[str, dict[str, float]]:
    out = {}
    for tsv in sorted((results / "benchmarks").glob("*.tsv")):
        with open(tsv, newline="") as fh:
            row = next(csv.DictReader(fh, delimiter="\t"), None)
        if row:
            out[tsv.stem] = {"seconds": float(row["s"]), "max_rss_mb": float(row["max_rss"])}
    return out


def read_metrics(results: Path) -> dict[str, float]:
    metrics = {}
    report = results / "adapter" / "train_report.json"
    if report.is_file():
        train = json.loads(report.read_text())["metrics"]
        for key in ("train_loss", "eval_loss"):
            if key in train:
                metrics[key] = train[key]
    summary = results / "eval" / "summary.json"
    if summary.is_file():
        for row in json.loads(summary.read_text())["rows"]:
            metrics[f"tuned {row['metric']}"] = row["tuned"]
    return metrics


def _strip_volatile(value):
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if not VOLATILE.search(k)}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.dumps(_strip_volatile(json.loads(data)), sort_keys=True).encode()
        except ValueError:
            pass
    return hashlib.sha256(data).hexdigest()


def artifact_digests(results: Path) -> dict[str, dict[str, str]]:
    """artifact folder -> {file: digest}; provenance records and Snakemake's benchmarks left out."""
    out = {}
    for folder in sorted(p for p in results.rglob("*") if p.is_dir() and (p / "provenance.json").is_file()):
        name = str(folder.relative_to(results))
        out[name] = {str(f.relative_to(folder)): file_digest(f) for f in sorted(folder.rglob("*"))
                     if f.is_file() and f.name != "provenance.json"}
    for f in sorted(results.glob("eval/*/*.json*")) + sorted(results.glob("eval/summary.*")):
        out[str(f.relative_to(results))] = {f.name: file_digest(f)}
    return out


def compare_artifacts(runs: list[dict[str, dict[str, str]]]) -> dict[str, list[str]]:
    """artifact -> the files that differ between runs (empty: identical in every run)."""
    result = {}
    for name in sorted(set().union(*runs)):
        versions = [r.get(name, {}) for r in runs]
        files = sorted(set().union(*versions))
        result[name] = [f for f in files if len({v.get(f) for v in versions}) > 1]
    return result


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:10.4g} ± {sd:<9.3g} [{min(values):.4g} – {max(values):.4g}]"


def table(benchmarks: list[dict], metrics: list[dict], identical: dict[str, list[str]], n: int) -> str:
    lines = [f"{'job':<26} {'seconds (mean ± sd [min – max])':<46} {'max RSS MB (mean ± sd [min – max])'}"]
    for job in sorted(set().union(*benchmarks)):
        secs = [b[job]["seconds"] for b in benchmarks if job in b]
        rss = [b[job]["max_rss_mb"] for b in benchmarks if job in b]
        lines.append(f"{job:<26} {spread(secs):<46} {spread(rss)}")
    totals = [sum(j["seconds"] for j in b.values()) for b in benchmarks]
    lines.append(f"{'all jobs':<26} {spread(totals)}")
    lines += ["", f"{'metric':<40} {'mean ± sd [min – max]':<46}"]
    for key in sorted(set().union(*metrics)):
        values = [m[key] for m in metrics if key in m]
        lines.append(f"{key:<40} {spread(values)}")
    lines += ["", f"artifacts across {n} runs (provenance records and timing fields aside):"]
    for name, differing in identical.items():
        lines.append(f"  {name:<38} " + ("identical" if not differing else "DIFFERS: " + ", ".join(differing)))
    return "\n".join(lines)


def bench(config_file: Path, runs: int, target: str, cores: int, out: Path, extra: list[str]) -> dict:
    if runs < 1:
        raise TunelineError("--runs must be at least 1")
    cfg = run_config(config_file)
    out.mkdir(parents=True, exist_ok=True)
    benchmarks, metrics, digests, walls = [], [], [], []
    for i in range(1, runs + 1):
        work = out / f"run-{i}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        (work / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
        cmd = [sys.executable, "-m", "snakemake", "--configfile", str(work / "config.yaml"),
               "--snakefile", str(REPO / "Snakefile"), "--directory", str(work), "--cores", str(cores),
               *extra, target]
        print(f"run {i}/{runs}: {target} in {work} ...", end=" ", flush=True)
        start = time.perf_counter()
        with open(work / "snakemake.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        walls.append(time.perf_counter() - start)
        if proc.returncode != 0:
            print("failed")
            raise TunelineError(f"run {i} failed: see {work / 'snakemake.log'}")
        print(f"{walls[-1]:.0f} s")
        results = work / "results"
        benchmarks.append(read_benchmarks(results))
        metrics.append(read_metrics(results))
        digests.append(artifact_digests(results))
    identical = compare_artifacts(digests)
    text = table(benchmarks, metrics, identical, runs)
    summary = {"config": str(config_file), "target": target, "runs": runs, "cores": cores,
               "wall_seconds": walls, "benchmarks": benchmarks, "metrics": metrics,
               "differing_files": identical}
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "bench.txt").write_text(text + "\n")
    print()
    print(text)
    return summary
