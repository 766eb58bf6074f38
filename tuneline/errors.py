class TunelineError(Exception):
    """A user-facing error: the message names the culprit (file, line, key) and what to do.

    Rule scripts print it without a traceback and exit non-zero, so Snakemake deletes the
    job's outputs and nothing half-written is taken as complete.
    """
