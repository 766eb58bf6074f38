"""The `tuneline` command: `tuneline chat`, `tuneline keys` and `tuneline bench`."""

from __future__ import annotations

import argparse
import sys

from .errors import TunelineError


def _chat(args) -> int:
    from .chat import Chat, interactive

    generation = {"max_new_tokens": args.max_new_tokens}
    if args.sample:
        generation["do_sample"] = True
    chat = Chat(args.model, generation, system=args.system or "")
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


def _bench(args) -> int:
    from pathlib import Path

    from .bench import bench

    config = Path(args.config)
    out = Path(args.out) if args.out else Path("bench") / config.stem
    bench(config, args.runs, args.target, args.cores, out, args.snakemake_args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tuneline", description="LLM fine-tuning as a Snakemake pipeline. "
                                     "Run the pipeline with `snakemake --cores 4 results/merged_model`.")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="chat with a model folder or GGUF file (default: results/merged_model)",
                          description="Chat in the terminal with the template the model was trained with. "
                                      "Type /clear to forget the conversation, /exit to quit.")
    chat.add_argument("model", nargs="?", default="results/merged_model",
                      help="a model folder (merged or bnb export) or a .gguf file from results/export/gguf")
    chat.add_argument("--prompt", action="append", help="answer this prompt and exit (repeat for a conversation)")
    chat.add_argument("--system", help="system prompt")
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
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except TunelineError as err:
        print(f"tuneline: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
