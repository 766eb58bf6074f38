"""The `tuneline` command: `tuneline run`, `check`, `chat`, `keys` and `bench`."""

from __future__ import annotations

import argparse
import sys

from .errors import TunelineError


def _chat(args) -> int:
    from .chat import Chat, interactive

    generation = {"max_new_tokens": args.max_new_tokens}
    if args.sample:
        generation["do_sample"] = True
    chat = Chat(args.model, generation, system=args.system or "", base=args.base)
    if args.prompt:
        for prompt in args.prompt:
            print(f"You: {prompt}")
            sys.stdout.write("Assistant: ")
            chat.reply(prompt, stream=sys.stdout)
            sys.stdout.write("\n")
        return 0
    interactive(chat)
    return 0


def _keys(args) -> int:
    from .config import write_docs

    if args.write:
        for path in write_docs():
            print(f"wrote {path}")
    else:
        from .config import markdown_table

        sys.stdout.write(markdown_table())
    return 0


def _configfiles(snakemake_args: list[str]) -> list[str]:
    """The files after --configfile/--configfiles (several may follow one flag, as in Snakemake)."""
    files, taking = [], False
    for arg in snakemake_args:
        if arg in ("--configfile", "--configfiles"):
            taking = True
        elif arg.startswith(("--configfile=", "--configfiles=")):
            files.append(arg.split("=", 1)[1])
            taking = False
        elif arg.startswith("-"):
            taking = False
        elif taking:
            files.append(arg)
    return files


def _check(args) -> int:
    from .config import check_config_file

    for path in args.files:
        check_config_file(path)
        print(f"{path}: OK")
    return 0


def _run(args) -> int:
    import os

    from .config import check_config_file

    for path in _configfiles(args.snakemake_args):
        check_config_file(path)
    argv = [sys.executable, "-m", "snakemake", *args.snakemake_args]  # this environment's snakemake
    if not any(a in ("--cores", "-c", "--jobs", "-j", "--profile") or a.startswith(("--cores=", "-c", "-j"))
               for a in args.snakemake_args):
        argv += ["--cores", "all"]
    os.execv(sys.executable, argv)
    return 0  # not reached


def _bench(args) -> int:
    from pathlib import Path

    from .bench import bench

    config = Path(args.config)
    out = Path(args.out) if args.out else Path("bench") / config.stem
    bench(config, args.runs, args.target, args.cores, out, args.snakemake_args)
    return 0


def _board(args) -> int:
    import secrets
    from pathlib import Path

    import uvicorn

    from .board.app import LOOPBACK, create_app

    token = secrets.token_urlsafe(24)
    hosts = {f"{args.host}:{args.port}"}
    if args.host in LOOPBACK:
        hosts |= {f"127.0.0.1:{args.port}", f"localhost:{args.port}", f"[::1]:{args.port}"}
    else:
        print(f"warning: {args.host} is not a loopback address: anyone who can reach it and has the token below "
              "can run jobs on this machine", file=sys.stderr)
    app = create_app(Path(args.project), token, hosts)
    print(f"Tuneline board: http://{args.host}:{args.port}/?token={token}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description="LLM fine-tuning as a Snakemake pipeline. "
                                     "Run the pipeline with `snakemake --cores 4 results/merged_model`.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="check the --configfile files, then run snakemake with the same arguments",
        description="`tuneline run results/merged_model --configfile my.yaml` is `snakemake` with the same "
                    "arguments (plus `--cores all` when no core count is given), after checking each config "
                    "file first: Snakemake reads --configfile before any Tuneline code runs and reports a YAML "
                    "error without its file or line; this names both.")
    run.add_argument("snakemake_args", nargs=argparse.REMAINDER, metavar="SNAKEMAKE_ARGS",
                     help="targets and snakemake options, as given to snakemake")
    run.set_defaults(fn=_run)
    check = sub.add_parser("check", help="check config files (YAML syntax with file and line, keys, values)",
                           description="Run every check the workflow runs on a config file, without running it.")
    check.add_argument("files", nargs="+", help="config files, as given to snakemake --configfile")
    check.set_defaults(fn=_check)
    chat = sub.add_parser("chat", help="chat with a model folder or GGUF file (default: results/merged_model)",
                          description="Chat in the terminal with the template the model was trained with. "
                                      "Type /clear to forget the conversation, /exit to quit.")
    chat.add_argument("model", nargs="?", default="results/merged_model",
                      help="a model folder (merged or bnb export) or a .gguf file from results/export/gguf")
    chat.add_argument("--prompt", action="append", help="answer this prompt and exit (repeat for a conversation)")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--base", help="for a LoRA adapter folder (e.g. results/adapter): the model it applies to "
                                     "(default: the base its adapter_config.json names)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    chat.set_defaults(fn=_chat)
    keys = sub.add_parser("keys", help="print the config key table (Markdown), generated from config/schema.yaml")
    keys.add_argument("--write", action="store_true", help="regenerate docs/config.md and the README's key table")
    keys.set_defaults(fn=_keys)
    bench = sub.add_parser(
        "bench", help="rerun a config N times from scratch: mean/spread of time, memory, loss, scores",
        description="Run the pipeline N times, each in a fresh folder <out>/run-<i>, with the config's "
                    "fixed seed. Prints mean and spread of each job's time and peak memory (Snakemake's "
                    "benchmark: records), of the losses and evaluation scores, and whether every artifact "
                    "came out identical. Writes <out>/bench.json and bench.txt.")
    bench.add_argument("config", help="a Tuneline config file (YAML), as given to snakemake --configfile")
    bench.add_argument("--runs", type=int, default=3, help="how many runs (default 3)")
    bench.add_argument("--target", default="all", help="Snakemake target (default all: merged model + evaluation)")
    bench.add_argument("--cores", type=int, default=2, help="snakemake --cores (default 2)")
    bench.add_argument("--out", help="folder for the runs (default bench/<config name>)")
    bench.add_argument("snakemake_args", nargs="*", metavar="-- SNAKEMAKE_ARGS",
                       help="further snakemake options after --, e.g. -- --profile profiles/slurm")
    bench.set_defaults(fn=_bench)
    board = sub.add_parser(
        "board", help="a local web page: configure, plan, start, watch and stop runs",
        description="Serve the board on 127.0.0.1 (a random token per start, printed as the URL to open). "
                    "Runs are snakemake runs in runs/<name>/ of the project (output_dir).")
    board.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    board.add_argument("--port", type=int, default=7860)
    board.add_argument("--project", default=".", help="the project folder runs and configs live in (default .)")
    board.set_defaults(fn=_board)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"] and not {"-h", "--help"} & set(argv[1:2]):  # everything after `run` is snakemake's
        args = argparse.Namespace(fn=_run, snakemake_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except TunelineError as err:
        print(f"tuneline: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
