"""The board's plan worker: Snakemake imported once, each dry run in a forked child of this process.

    python -m tuneline.board.plan_worker

A dry run from the command line spends most of its time importing Snakemake and collecting its plugins
(about 1.2 s of 2.6 s here); this process does that once at start and then forks a child per request, which
runs `snakemake.cli.main` with the request's argv, exactly as `python -m snakemake ARGV` does, in a fresh
copy of the warm process: no Snakemake state is carried from one plan to the next. The board's own process
stays free of Snakemake (it serves pages from several threads, and forking a threaded process is unsafe).

Reads one JSON request per line on stdin ({"argv": [...], "cwd": "..."}, argv without the interpreter and
`-m snakemake`) and answers one JSON line per request: {"returncode": N, "output": "..."} (stdout and stderr
of the dry run, together). Writes {"ready": true} once warm.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile


def warm() -> None:
    """Import what every dry run imports: Snakemake, its plugin registries, and the workflow's own modules."""
    import snakemake.api  # noqa: F401  (the workflow, DAG and scheduler modules)
    import snakemake.cli

    snakemake.cli.get_argument_parser()  # collects the executor, storage, report and logger plugins
    import tuneline.config  # noqa: F401  (workflow/rules/common.smk)


def dry_run(argv: list[str], cwd: str) -> dict:
    """Fork; the child runs Snakemake with its stdout and stderr in a temporary file; wait; read the file."""
    with tempfile.TemporaryFile(mode="w+b") as out:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.setsid()  # a stop of the board's plan reaches the whole dry run
                os.chdir(cwd)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                sys.stdin = open(os.devnull)
                from snakemake.cli import main

                main(argv)
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:  # anything else: its traceback goes to the output
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        return {"returncode": os.waitstatus_to_exitcode(status), "output": out.read().decode(errors="replace")}


def main() -> int:
    warm()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(dry_run(request["argv"], request["cwd"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
