"""Snakemake logger plugin `tuneline`: the board's event stream.

`snakemake --logger tuneline --logger-tuneline-path runs/NAME/events.jsonl` appends one JSON line
per scheduling event (job_info, job_started, job_finished, job_error, progress, error), flushed as
it happens, so the board shows per-rule progress from Snakemake's own events instead of parsing its
human-readable output. Snakemake finds logger plugins by module name on sys.path (not through an
editable install's import hook), so the board puts this folder's parent on PYTHONPATH.
"""

# no `from __future__ import annotations`: Snakemake builds its CLI options from the settings' real types
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from snakemake_interface_logger_plugins.base import LogHandlerBase
from snakemake_interface_logger_plugins.settings import LogHandlerSettingsBase

# the record attributes each event carries (snakemake/jobs.py, scheduling/job_scheduler.py, exceptions.py)
FIELDS = {
    "job_info": ("jobid", "rule_name", "reason", "threads"),
    "job_started": ("jobs",),
    "job_finished": ("job_id",),
    "job_error": ("jobid", "rule_name", "log"),
    "progress": ("done", "total"),
    "error": ("exception",),
}


@dataclass
class LogHandlerSettings(LogHandlerSettingsBase):
    path: Optional[str] = field(default=None, metadata={"help": "JSON-lines file the events are appended to",
                                                         "env_var": False, "required": True})


class LogHandler(LogHandlerBase):
    def __post_init__(self) -> None:
        self.baseFilename = self.settings.path
        self._file = open(self.settings.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def emit(self, record) -> None:
        event = str(getattr(record, "event", "") or "")
        if event not in FIELDS:
            return
        line = {"t": round(time.time(), 3), "event": event}
        for name in FIELDS[event]:
            value = getattr(record, name, None)
            line[name] = value if isinstance(value, (int, float, str, list, type(None))) else str(value)
        if event in ("job_error", "error"):
            line["message"] = record.getMessage()
        with self._lock:
            self._file.write(json.dumps(line, default=str) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
        super().close()

    @property
    def writes_to_stream(self) -> bool:
        return False

    @property
    def writes_to_file(self) -> bool:
        return True

    @property
    def has_filter(self) -> bool:
        return True  # every event above is wanted, whatever --quiet says

    @property
    def has_formatter(self) -> bool:
        return True

    @property
    def needs_rulegraph(self) -> bool:
        return False
