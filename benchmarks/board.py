"""The board's speed: start to first page, a page load, and a plan (Snakemake's dry run), side by side with
`snakemake -n` of the same config from the command line, in the same run (the machine is shared: compare
the ratio). Targets (issue #17): first page under 1 s, plan under 2 s. The board keeps Snakemake imported in
a plan worker (tuneline/board/plan_worker.py) that it warms at start: the first plan may wait for that.

    python benchmarks/board.py [--repeat 5]
"""

import argparse
import http.cookiejar
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = {"board start -> first page": [], "page load": [], "first plan (board just started)": [], "plan (board)": [], "snakemake -n (command line)": []}
    with tempfile.TemporaryDirectory() as project:
        for _ in range(args.repeat):
            port = free_port()
            start = time.perf_counter()
            proc = subprocess.Popen([str(BIN / "tuneline"), "board", "--port", str(port), "--project", project],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
            while True:
                try:
                    opener.open(url).read()
                    break
                except urllib.error.URLError:
                    time.sleep(0.02)
            rows["board start -> first page"].append(time.perf_counter() - start)
            t = time.perf_counter()
            opener.open(f"http://127.0.0.1:{port}/").read()
            rows["page load"].append(time.perf_counter() - t)
            t = time.perf_counter()
            body = urllib.parse.urlencode({"target": "all", "name": "bench", "lora_rank": "16",
                                           "dataset_dir": str(REPO / "resources"),
                                           "task_dir": str(REPO / "resources" / "eval")}).encode()
            reply = opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/plan", data=body)).read().decode()
            rows["first plan (board just started)"].append(time.perf_counter() - t)
            assert 'class="job"' in reply, reply[:2000]
            t = time.perf_counter()  # the plan worker is warm now: every later plan, e.g. after editing a key
            reply = opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/plan",
                                                       data=body.replace(b"lora_rank=16", b"lora_rank=8"))).read()
            rows["plan (board)"].append(time.perf_counter() - t)
            assert b'class="job"' in reply, reply[:2000]
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            t = time.perf_counter()
            subprocess.run([str(BIN / "snakemake"), "--configfile", f"{project}/runs/bench/plan.yaml", "--snakefile",
                            str(REPO / "Snakefile"), "--cores", "all", "-n", "all"], cwd=project, capture_output=True,
                           check=True)
            rows["snakemake -n (command line)"].append(time.perf_counter() - t)
    print(f"{'step':32} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, times in rows.items():
        print(f"{name:32} {statistics.median(times):9.2f} {min(times):7.2f} {max(times):7.2f}")


if __name__ == "__main__":
    main()
