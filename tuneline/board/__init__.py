"""`tuneline board`: a local web page over the same DAG the command line runs.

What a page does is what `snakemake` does: the form is generated from config/schema.yaml, a config
is the keys changed from the workflow's defaults (schema <- config/config.yaml <- a loaded file),
the plan is Snakemake's own dry run of it, and a run is `snakemake` in a process group of its own,
in an `output_dir` folder runs/<name>/ of the project, stopped with SIGTERM to the group (Snakemake
then removes the output of the jobs it cancels and releases its lock).

Security (LLaMA Board binds 0.0.0.0 without login): bound to 127.0.0.1 by default; a random token per
start, printed as a URL and then kept in a SameSite=Strict cookie, is needed on every request;
requests whose Host is not the board's or whose Origin is another site's get 403; targets come from
a fixed list, run and config names match a pattern, files are read and written only inside the
project, and processes are started from argument lists (no shell).

Modules: `forms` (schema -> fields, form -> config), `runs` (plan, start, stop, status), `app`
(the Starlette routes and the security middleware).
"""

from __future__ import annotations
