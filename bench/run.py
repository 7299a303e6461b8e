"""Run the benchmarks and write their figures to docs/benchmarks.md.

    python bench/run.py              # every benchmark
    python bench/run.py pipeline     # just one

Each benchmark module (``bench/<name>.py``) has ``TITLE`` and
``run(work) -> markdown``; its section of docs/benchmarks.md is replaced,
the others are kept, so benchmarks can be rerun one at a time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._util import machine  # noqa: E402

BENCHMARKS = ["pipeline", "ingest", "predict", "train", "encoders", "instance", "isbi_cells", "server_log"]
DOC = ROOT / "docs" / "benchmarks.md"
WORK = ROOT / "bench" / ".work"
HEADER = """# Benchmarks

Written by `make bench` (`python bench/run.py [name]`); each section is
replaced when its benchmark reruns. Figures within a section are measured
side by side in one run on the machine it names; compare across sections
only on the same machine.
"""


def _section(name: str, title: str, body: str) -> str:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<!-- bench:{name}:start -->\n## {title}\n\n"
        f"`python bench/run.py {name}` ({when}; {machine()})\n\n{body}\n<!-- bench:{name}:end -->"
    )


def update(doc: str, name: str, section: str) -> str:
    """``doc`` with the section of benchmark ``name`` replaced (or appended)."""
    pattern = re.compile(rf"<!-- bench:{name}:start -->.*?<!-- bench:{name}:end -->", re.S)
    if pattern.search(doc):
        return pattern.sub(lambda _: section, doc)
    return doc.rstrip("\n") + "\n\n" + section + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"benchmarks to run (default: all of {BENCHMARKS})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or BENCHMARKS
    doc = DOC.read_text() if DOC.is_file() else HEADER
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        work = WORK / name
        print(f"bench {name}: running in {work} ...", flush=True)
        body = module.run(work)
        doc = update(doc, name, _section(name, module.TITLE, body))
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(doc)
        shutil.rmtree(work, ignore_errors=True)
        print(body, flush=True)
    print(f"written to {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
