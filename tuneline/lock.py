"""requirements.lock: the exact versions the test suite passed with, installed by `make install`.

pyproject.toml keeps version ranges for people who import the package; the lock is what the
README's commands (make demo, make test, .ci/run) install, so a run reproduces on a fresh machine
whatever the package index serves that day. `make lock` moves it forward: newest versions in a
scratch venv, the whole test suite, and only then `python -m tuneline.lock write`.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

# the project itself, and the venv's own installers
NOT_LOCKED = {"tuneline", "pip", "setuptools", "wheel"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: str | Path) -> dict[str, str]:
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version.strip()
    return pins


def environment() -> dict[str, str]:
    """Every distribution in this interpreter's environment, but the ones never locked."""
    found = {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    return {name: version for name, version in found.items() if name not in NOT_LOCKED}


def installed(name: str) -> str | None:
    return environment().get(normalize(name))


def write(path: str | Path) -> None:
    lines = ["# Exact versions the whole test suite passed with (written by `make lock`; do not edit by hand).",
             f"# Python {sys.version.split()[0]}. Installed by `make install` as pip constraints.",
             *(f"{name}=={version}" for name, version in sorted(environment().items()))]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("write", "check"):
        print("usage: python -m tuneline.lock write|check requirements.lock", file=sys.stderr)
        return 2
    if args[0] == "write":
        write(args[1])
        print(f"wrote {args[1]}")
        return 0
    pins, have = read(args[1]), environment()
    wrong = sorted(set(pins) | set(have))
    wrong = [f"{n}: locked {pins.get(n)}, installed {have.get(n)}" for n in wrong if pins.get(n) != have.get(n)]
    print("\n".join(wrong) or "the environment holds exactly the locked versions")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
