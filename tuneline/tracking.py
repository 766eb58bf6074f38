"""Experiment trackers (`report_to`), wired through the Trainer's own callbacks, offline by default.

tensorboard: event files beside the checkpoints, copied into the adapter folder (runs/) at the end.
mlflow: a local file store, `mlruns/` in the folder the workflow runs in (its output_dir for a
LLaMA-Factory-style run), unless MLFLOW_TRACKING_URI names another; `mlflow ui --backend-store-uri
mlruns` shows every run of the project. wandb: offline mode (runs under wandb/, `wandb sync` uploads
them later) unless WANDB_MODE is set. Each tracker's run is named after the training run's key.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import TunelineError

PACKAGES = {"mlflow": "mlflow-skinny", "wandb": "wandb"}


def configure(report_to: str, ckpt: Path, log) -> str | None:
    """Set the tracker's environment for this process. -> where its records go (None: nowhere)."""
    if report_to == "mlflow":
        os.environ.pop("DISABLE_MLFLOW_INTEGRATION", None)
    else:  # TRL imports mlflow whenever it is installed (1.2 s per training job, measured) unless this is set
        os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(ckpt / "runs")
        return str(ckpt / "runs")
    if importlib.util.find_spec(report_to) is None:
        raise TunelineError(f"report_to {report_to}: the {report_to} package is not installed "
                            f"(pip install {PACKAGES[report_to]}), or use report_to: tensorboard.")
    if report_to == "mlflow":
        if "MLFLOW_TRACKING_URI" not in os.environ:  # MLflow 3 keeps its file store in maintenance mode and
            # refuses it unless allowed; its database store needs SQLAlchemy, which mlflow-skinny leaves out
            os.environ["MLFLOW_TRACKING_URI"] = (Path.cwd() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "tuneline")
        where = os.environ["MLFLOW_TRACKING_URI"]
    else:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(Path.cwd()))
        os.environ.setdefault("WANDB_PROJECT", "tuneline")
        os.environ.setdefault("WANDB_SILENT", "true")
        where = f"{os.environ['WANDB_DIR']}/wandb ({os.environ['WANDB_MODE']})"
    log.info("report_to %s: metrics go to %s", report_to, where)
    return where


def finish(report_to: str) -> None:
    """Close the tracker's run once the final validation is logged (a wandb offline run is complete
    only after finish; the Trainer's callbacks leave the run open for evaluate)."""
    if report_to == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
    elif report_to == "mlflow":
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.end_run()
