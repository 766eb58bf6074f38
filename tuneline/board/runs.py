"""Plans and runs for the board: Snakemake's own dry run, and `snakemake` processes in runs/<name>/.

A run is the `output_dir` mechanism of the command line: runs/<name>/config.yaml holds the changed
keys plus `output_dir: runs/<name>`, and `snakemake --configfile runs/<name>/config.yaml TARGET`
runs in the project, so its results, logs and Snakemake state live in runs/<name>/ and two runs
never overwrite each other. The process runs in a session of its own; Stop sends SIGTERM to the
whole group (Snakemake cancels its jobs, removes their incomplete output and releases its lock),
then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from ..config import SCHEMA_PATH
from ..history import LIVE, read_live
from ..provenance import FILENAME, SIDECAR_GLOB
from .forms import workflow_config

REPO = SCHEMA_PATH.parent.parent
SNAKEFILE = REPO / "Snakefile"
TARGETS = ("all", "results/adapter", "results/merged_model", "evaluate", "export")
# the Export tab's formats: each a target of its own (GPTQ needs a CUDA GPU)
EXPORTS = ("results/export/gguf", "results/export/bnb-4bit", "results/export/bnb-8bit", "results/export/gptq-4bit")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STOP_GRACE_S = 30
PLUGINS = Path(__file__).parent / "plugins"  # the snakemake_logger_plugin_tuneline package
EVENTS = "events.jsonl"
LOG_LINES = 12  # the log lines the run list shows (and pushes as they change)


def checked_name(name: str) -> str:
    if not NAME.match(name or "") or ".." in name:
        raise ValueError(f"name {name!r}: letters, digits, '.', '_' and '-' only (at most 64), not starting with "
                         "a dot or dash")
    return name


def checked_target(target: str) -> str:
    if target not in TARGETS + EXPORTS:
        raise ValueError(f"target {target!r}: one of {', '.join(TARGETS + EXPORTS)}")
    return target


def command(configfile: str, target: str | list[str], dry_run: bool = False) -> list[str]:
    """The exact snakemake argv (also shown on the page as the command preview)."""
    # --configfile takes several values: it goes first, so that nothing after it is read as a config file
    argv = [sys.executable, "-m", "snakemake", "--configfile", configfile, "--snakefile", str(SNAKEFILE),
            "--cores", "all"]
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("no target chosen")
    return argv + (["--dry-run"] if dry_run else []) + [checked_target(t) for t in targets]


def shown(argv: list[str]) -> str:
    return " ".join(["snakemake", *argv[3:]])


def write_config(project: Path, name: str, changed: dict, filename: str) -> str:
    """runs/<name>/<filename>: the changed keys plus `output_dir: runs/<name>`. -> its path in the project."""
    folder = project / "runs" / checked_name(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_text(yaml.safe_dump({**changed, "output_dir": f"runs/{name}"}, sort_keys=True))
    return f"runs/{name}/{filename}"


def plan(project: Path, changed: dict, target: str, name: str = "plan") -> dict:
    """Snakemake's dry run of the changed keys in runs/<name>/: {jobs: [{rule, reason}], command, ok, output}."""
    # plan.yaml: config.yaml stays the one the run ran with
    argv = command(write_config(project, name, changed, "plan.yaml"), target, dry_run=True)
    start = time.perf_counter()
    reply = plan_worker().dry_run(argv[3:], project)  # what `python -m snakemake ARGV` runs, in a warm process
    output = reply["output"]
    jobs = []
    for block in re.finditer(r"^(?:local)?rule (\w+):\n((?:[ \t]+.*\n?)*)", output, re.M):  # the indented lines
        reason = re.search(r"^\s*reason: (.+)$", block.group(2), re.M)
        if block.group(1) != "all":
            jobs.append({"rule": block.group(1), "reason": reason.group(1) if reason else ""})
    return {"jobs": jobs, "ok": reply["returncode"] == 0, "output": output[-4000:], "nothing": "Nothing to be done" in output,
            "command": shown(command(f"runs/{name}/config.yaml", target)),
            "seconds": round(time.perf_counter() - start, 2)}


def start(project: Path, name: str, changed: dict, target: str) -> dict:
    """A new run (or a rerun of `name` with new keys): its config.yaml, then snakemake TARGET in the background."""
    if status(project, name)["state"] == "running":
        raise ValueError(f"run {name} is running already")
    write_config(project, name, changed, "config.yaml")
    return launch(project, name, [target])


def launch(project: Path, name: str, targets: list[str]) -> dict:
    """Further targets of an existing run with its own config.yaml (the Evaluate and Export tabs)."""
    folder = project / "runs" / checked_name(name)
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"no run {name}: start it from the Train tab first")
    if status(project, name)["state"] == "running":
        raise ValueError(f"run {name} is running already")
    # the board's event stream: Snakemake's scheduling events as JSON lines, from the logger plugin in PLUGINS
    argv = command(f"runs/{name}/config.yaml", targets) + [
        "--logger", "tuneline", "--logger-tuneline-path", f"runs/{name}/{EVENTS}"]
    (folder / EVENTS).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")]))}
    with open(folder / "board.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=project, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    info = {"name": name, "pid": proc.pid, "target": " ".join(targets), "command": shown(argv), "started": time.time()}
    (folder / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    _CHILDREN[proc.pid] = proc
    return info


_CHILDREN: dict[int, subprocess.Popen] = {}  # started by this board process: reaped when they end


def _alive(pid: int) -> bool:
    proc = _CHILDREN.get(pid)
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status(project: Path, name: str) -> dict:
    folder = project / "runs" / checked_name(name)
    if not (folder / "run.json").is_file():
        return {"name": name, "state": "none"}
    info = json.loads((folder / "run.json").read_text())
    log = folder / "board.log"
    info["log_tail"] = log.read_text(errors="replace")[-6000:] if log.is_file() else ""
    info["rules"], info["progress"] = events(folder / EVENTS)
    if _alive(info["pid"]):
        info["state"] = "running"
    else:
        proc = _CHILDREN.get(info["pid"])
        code = info["returncode"] = proc.returncode if proc is not None else None  # None: an earlier board's run
        progress = info["progress"]
        complete = code == 0 or (code is None and progress is not None and progress["done"] == progress["total"])
        info["state"] = "stopped" if info.get("stopped") else ("finished" if complete else "failed")
    info["loss"], info["eval_loss"] = loss_curves(folder)
    return info


def events(path: Path) -> tuple[list[dict], dict | None]:
    """Per-job states (rule, running/done/failed) and the last progress event, from the plugin's JSON lines."""
    jobs, progress = {}, None
    for event in read_live(path):
        kind = event.get("event")
        if kind == "job_info":
            jobs[event["jobid"]] = {"rule": event["rule_name"], "state": "running", "reason": event.get("reason", "")}
        elif kind == "job_finished" and event.get("job_id") in jobs:
            jobs[event["job_id"]]["state"] = "done"
        elif kind == "job_error" and event.get("jobid") in jobs:
            jobs[event["jobid"]]["state"] = "failed"
        elif kind == "progress":
            progress = {"done": event["done"], "total": event["total"]}
    return [job for job in jobs.values() if job["rule"] != "all"], progress


def loss_curves(folder: Path) -> tuple[list, list]:
    """(training, validation) [(step, loss)] of a run: the finished adapter's loss_history.json, or while it
    trains the live lines its checkpoint folder gets (history.live_loss_callback)."""
    history_file = folder / "results" / "adapter" / "loss_history.json"
    if history_file.is_file():
        history = json.loads(history_file.read_text())
    else:
        live = sorted((folder / ".tuneline" / "checkpoints").glob(f"train-*/{LIVE}"), key=lambda p: p.stat().st_mtime)
        history = read_live(live[-1]) if live else []
    return ([(h["step"], h["loss"]) for h in history if "loss" in h],
            [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h])


def stop(project: Path, name: str, grace_s: float = STOP_GRACE_S) -> dict:
    """SIGTERM to the run's process group; SIGKILL if it has not ended after grace_s."""
    folder = project / "runs" / checked_name(name)
    info = json.loads((folder / "run.json").read_text())
    pid = info["pid"]
    if _alive(pid):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + grace_s
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        proc = _CHILDREN.get(pid)
        if proc is not None:
            proc.wait()
        info["stopped"] = True
        (folder / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return status(project, name)


def compare(project: Path, a: str, b: str) -> dict:
    """Two runs side by side: the config keys that differ, and each one's evaluation summary."""
    base = workflow_config()  # a key a run left unchanged has the workflow's value
    side, merged = {}, {}
    for name in (a, b):
        folder = project / "runs" / checked_name(name)
        config, summary = folder / "config.yaml", folder / "results" / "eval" / "summary.md"
        report = folder / "results" / "adapter" / "train_report.json"
        side[name] = {"config": yaml.safe_load(config.read_text()) if config.is_file() else {},
                      "summary": summary.read_text() if summary.is_file() else "(not evaluated: target evaluate)",
                      "report": json.loads(report.read_text()) if report.is_file() else {}}
        merged[name] = {**base, **side[name]["config"]}
    keys = sorted((set(side[a]["config"]) | set(side[b]["config"])) - {"output_dir"})
    diff = [(k, merged[a].get(k), merged[b].get(k)) for k in keys if merged[a].get(k) != merged[b].get(k)]
    return {"a": a, "b": b, "diff": diff, "side": side}


def details(project: Path, name: str, samples: int = 5) -> dict:
    """What a run has written: its config, evaluation summary, sample predictions (base and tuned), and each
    export's verification figures (export_report.json)."""
    folder = project / "runs" / checked_name(name)
    info = status(project, name)
    config = folder / "config.yaml"
    info["config"] = config.read_text() if config.is_file() else ""
    summary = folder / "results" / "eval" / "summary.md"
    info["summary"] = summary.read_text() if summary.is_file() else None
    info["predictions"] = {}
    for model in ("base", "tuned"):
        path = folder / "results" / "eval" / model / "generated_predictions.jsonl"
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()[:samples]
            info["predictions"][model] = [json.loads(line) for line in lines if line.strip()]
    info["exports"] = {p.parent.name: json.loads(p.read_text())
                       for p in sorted((folder / "results" / "export").glob("*/export_report.json"))}
    info["provenance"] = []  # each artifact's record: rule, when, its config slice, inputs with their sha256
    for record in sorted((folder / "results").rglob(FILENAME)) + sorted((folder / "results").rglob(SIDECAR_GLOB)):
        data = json.loads(record.read_text())
        info["provenance"].append({"artifact": data.get("artifact"), "rule": data.get("rule"),
                                   "created": data.get("created"), "config": data.get("config", {}),
                                   "inputs": {k: [i.get("sha256", "")[:12] for i in v]
                                              for k, v in data.get("inputs", {}).items()}})
    return info


def list_runs(project: Path) -> list[dict]:
    root = project / "runs"
    return [status(project, p.parent.name) for p in sorted(root.glob("*/run.json"))] if root.is_dir() else []


def signature(listed: list[dict]) -> list[tuple]:
    """What the run list shows that can change: the SSE stream sends the list again when this does."""
    return [(r["name"], r["state"], r.get("progress"), [(j["rule"], j["state"]) for j in r.get("rules", [])],
             len(r.get("loss", [])), len(r.get("eval_loss", [])), r.get("log_tail", "")[-LOG_LINES * 200:])
            for r in listed]


CHAT_MODELS = {"merged": "results/merged_model", "adapter": "results/adapter", "gguf": "results/export/gguf",
               "bnb-4bit": "results/export/bnb-4bit", "bnb-8bit": "results/export/bnb-8bit"}


class Worker:
    """A long-lived helper process (`python -m MODULE ARGS`) in a session of its own, spoken to in JSON lines:
    its first line says it is ready (or why not); each request gets one or more reply lines."""

    def __init__(self, module: str, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1, start_new_session=True)
        self.lock = threading.Lock()  # one request at a time
        first = json.loads(self.proc.stdout.readline() or f'{{"error": "{module} exited"}}')
        if "error" in first:
            self.proc.wait()
            raise ValueError(first["error"])

    def ask(self, request: dict):
        """Yield the reply's JSON lines as the worker writes them, until one says it is the last."""
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                message = json.loads(line)
                yield message
                if self.last(message):
                    return
        raise RuntimeError(f"the worker {self.proc.args[2]} exited")

    @staticmethod
    def last(message: dict) -> bool:
        return "done" in message or "error" in message

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


class ChatWorker(Worker):
    """One worker process per (run, model): the model is loaded once and kept there between messages."""

    def __init__(self, model_path: Path, base: Path | None = None):
        super().__init__("tuneline.board.chat_worker", [str(model_path)] + ([str(base)] if base else []))


class PlanWorker(Worker):
    """Snakemake imported once; each dry run in a fresh fork of it (see plan_worker.py)."""

    def __init__(self):
        super().__init__("tuneline.board.plan_worker", [])

    @staticmethod
    def last(message: dict) -> bool:
        return True

    def dry_run(self, argv: list[str], cwd: Path) -> dict:
        [reply] = list(self.ask({"argv": argv, "cwd": str(cwd)}))  # to the end: the lock is released there
        return reply


_WORKERS: dict[tuple[str, str], ChatWorker] = {}
_PLAN: list[PlanWorker] = []  # the board's one plan worker
_PLAN_LOCK = threading.Lock()


def plan_worker() -> PlanWorker:
    """The board's plan worker, started on first use (the board warms it at start)."""
    with _PLAN_LOCK:
        if not (_PLAN and _PLAN[0].alive()):
            _PLAN[:] = [PlanWorker()]
        return _PLAN[0]


def chat_model(project: Path, name: str, model: str) -> Path:
    if model not in CHAT_MODELS:
        raise ValueError(f"model {model!r}: one of {', '.join(CHAT_MODELS)}")
    path = project / "runs" / checked_name(name) / CHAT_MODELS[model]
    if model == "gguf":  # the first GGUF file of the export
        found = sorted(path.glob("*.gguf"))
        path = found[0] if found else path
    if not path.exists():
        raise ValueError(f"run {name} has no {CHAT_MODELS[model]} yet: start it with target "
                         f"{CHAT_MODELS[model] if model in ('merged', 'adapter') else 'export'}")
    return path


def chat_worker(project: Path, name: str, model: str) -> ChatWorker:
    key = (name, model)
    worker = _WORKERS.get(key)
    if worker is None or not worker.alive():
        # the adapter applies to the run's own base model (results/base_model), unmerged
        base = project / "runs" / name / "results" / "base_model" if model == "adapter" else None
        worker = _WORKERS[key] = ChatWorker(chat_model(project, name, model), base)
    return worker


def close_workers() -> None:
    for worker in [*_WORKERS.values(), *_PLAN]:
        worker.close()
    _WORKERS.clear()
    _PLAN.clear()
