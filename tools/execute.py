"""Regenerate the package, then re-execute chapters: notebooks/NN_topic.py -> executed .ipynb.

    python tools/execute.py notebooks/04_transformer.py [more.py ...]   # these chapters
    python tools/execute.py --from 05                                  # chapter 05 and later ones
    python tools/execute.py notebooks/A1_engineering.py               # an appendix notebook

For each chapter this runs `jupytext --sync --execute` (the working directory is notebooks/,
as under nbval), then removes the execution timestamps that Jupyter writes into every code
cell's metadata, so that re-running an unchanged chapter leaves its .ipynb unchanged apart
from genuinely variable outputs. One BLAS thread unless OPENBLAS_NUM_THREADS is set (results
are the same, and it is faster on a busy machine). Stops at the first chapter that fails.
`--from NN` also re-executes the appendix notebooks (notebooks/A1_*.py), which import the
chapters' code.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BIN = Path(sys.executable).parent


def strip_timestamps(ipynb: Path) -> None:
    """Drop the `execution` timing metadata of every cell, in place."""
    nb = nbformat.read(ipynb, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, ipynb)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sources", nargs="*", type=Path, help="notebooks/NN_topic.py files")
    parser.add_argument("--from", dest="start", metavar="NN",
                        help="execute chapter NN and every later chapter")
    args = parser.parse_args()
    sources = [p.resolve() for p in args.sources]
    if args.start:
        start = args.start.zfill(2)                               # "5" and "05" both work
        sources += [p for p in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")) if p.name[:2] >= start]
        sources += sorted(NOTEBOOKS.glob("A[0-9]_*.py"))          # the appendix notebooks
    if not sources:
        parser.error("name chapters (notebooks/NN_topic.py) or use --from NN")
    missing = [str(p) for p in sources if not p.is_file() or p.suffix != ".py"]
    if missing:
        parser.error(f"not a chapter source (notebooks/NN_topic.py): {', '.join(missing)}")

    subprocess.run([sys.executable, str(ROOT / "tools" / "export.py")], check=True)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    for source in sorted(set(sources), key=lambda p: (p.name[0].isalpha(), p.name)):
        print(f"executing {source.relative_to(ROOT)}", flush=True)
        done = subprocess.run([str(BIN / "jupytext"), "--sync", "--execute", str(source)],
                              cwd=NOTEBOOKS, env=env)
        if done.returncode:
            print(f"{source.name} failed: its .ipynb was not updated", file=sys.stderr)
            return done.returncode
        strip_timestamps(source.with_suffix(".ipynb"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
