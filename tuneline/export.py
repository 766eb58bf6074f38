"""Rule `export`: the export_format result copied to export_dir (LLaMA-Factory's output folder key)."""

from __future__ import annotations

import shutil
from pathlib import Path


def main(inputs, outputs, params, log, threads=1):
    source, target = Path(inputs["chosen"]), Path(outputs["export"])
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    log.info("copied %s (export_format %s) to %s", source, params["export_format"], target)
    return {"copied_from": str(source)}
