"""No-op dry-run time: Tuneline's Snakefile vs an empty one-rule workflow, in the same run.

The issue's target is < 2 s for `snakemake -n` when nothing is to be done. Run after the default
pipeline has finished (so there is nothing to do):  python benchmarks/dry_run.py [--repeat 7]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def timed(cmd, cwd) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stdout + proc.stderr)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as empty:
        Path(empty, "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch x"\n')
        Path(empty, "x").touch()
        rows = {"empty one-rule workflow": [], "tuneline (no-op, results/merged_model)": []}
        for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
            rows["empty one-rule workflow"].append(timed([SNAKEMAKE, "-n"], empty))
            rows["tuneline (no-op, results/merged_model)"].append(timed([SNAKEMAKE, "-n", "results/merged_model"], REPO))
    print(f"{'workflow':42} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, times in rows.items():
        print(f"{name:42} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")
    base, ours = (statistics.median(t) for t in rows.values())
    print(f"tuneline / empty: {ours / base:.2f}x  (target: tuneline median < 2 s)")


if __name__ == "__main__":
    main()
