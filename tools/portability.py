"""Does every stored output hold on other machines? Re-run the notebooks under imitated ones.

    python tools/portability.py                    # every chapter, every environment
    python tools/portability.py notebooks/03_attention.ipynb --envs haswell-1t,nehalem-1t
    python tools/portability.py --list             # the environments and what they load

Each environment of tools/numenv.py (an OpenBLAS kernel, NumPy's SIMD level, 1 or 2 BLAS
threads) runs `pytest --nbval` on the named notebooks in its own process and with its own
artifacts directory, with at most `--jobs` BLAS threads at once (default: one per core). The
report lists, per environment, each cell whose output or assert differs from the stored
notebook, with the first lines of nbval's diff. Exit status 1 if any cell fails anywhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import numenv  # noqa: E402


def run(env_name: str, notebooks: list[str], workdir: Path) -> dict:
    """Run nbval on `notebooks` in environment `env_name`; return counts and failures."""
    env = numenv.env_for(env_name)
    env["TRANSFORMER_LIB_ARTIFACTS"] = str(workdir / env_name / "artifacts")
    xml = workdir / f"{env_name}.xml"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *notebooks, "-q", "-p", "no:cacheprovider",
         f"--junitxml={xml}"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if not xml.exists() or proc.returncode not in (0, 1):    # 1: some test failed
        return dict(name=env_name, seconds=seconds, passed=0, failed=[],
                    error=f"pytest exited with {proc.returncode}:\n"
                          + (proc.stdout + proc.stderr)[-2000:])
    failed, passed = [], 0
    for case in ET.parse(xml).iter("testcase"):
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is None:
            passed += case.find("skipped") is None
            continue
        text = (problem.get("message") or "") + "\n" + (problem.text or "")
        lines = [ln for ln in text.splitlines() if ln.strip()]
        failed.append((case.get("name"), case.get("classname"), lines[:12]))
    error = None if passed or failed else "no cell ran (wrong notebook path?)"
    return dict(name=env_name, seconds=seconds, passed=passed, failed=failed, error=error)


class Cores:
    """At most `n` BLAS threads at once: a 2-thread environment takes two slots. (Two
    OpenBLAS threads on a core that is already busy make a run many times slower.)"""

    def __init__(self, n: int):
        self.free, self.cond = n, threading.Condition()
        self.n = n

    def run(self, threads: int, fn):
        threads = min(threads, self.n)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= threads)
            self.free -= threads
        try:
            return fn()
        finally:
            with self.cond:
                self.free += threads
                self.cond.notify_all()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebooks", nargs="*", help="notebooks (default: notebooks/*.ipynb)")
    p.add_argument("--envs", default=",".join(numenv.environments()),
                   help="comma-separated environment names (see --list)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="BLAS threads at once (default: the number of cores)")
    p.add_argument("--list", action="store_true", help="list the environments and exit")
    a = p.parse_args()
    if a.list:
        for name, variables in numenv.environments().items():
            print(f"{name:17} {numenv.describe(numenv.env_for(name))}   {variables}")
        return 0
    notebooks = ([str(Path(n).resolve()) for n in a.notebooks] or
                 sorted(str(q) for q in (ROOT / "notebooks").glob("*.ipynb")))
    for n in notebooks:
        if not Path(n).is_file():
            p.error(f"no notebook at {n}")
    names = a.envs.split(",")
    for name in names:
        numenv.env_for(name)                                   # fails early on a typo
        print(f"{name:17} {numenv.describe(numenv.env_for(name))}", flush=True)
    print(f"running {len(notebooks)} notebook(s) in {len(names)} environment(s), "
          f"at most {a.jobs} BLAS thread(s) at once ...", flush=True)
    t0 = time.perf_counter()
    cores = Cores(a.jobs)

    def one(name: str, tmp: str) -> dict:
        threads = int(numenv.environments()[name].get("OPENBLAS_NUM_THREADS", "1"))
        return cores.run(threads, lambda: run(name, notebooks, Path(tmp)))

    with tempfile.TemporaryDirectory(prefix="portability-") as tmp, \
            ThreadPoolExecutor(len(names)) as pool:
        reports = list(pool.map(lambda n: one(n, tmp), names))
    bad = 0
    for r in reports:
        status = "ok" if not r["failed"] and not r["error"] else "FAILED"
        print(f"\n== {r['name']}: {r['passed']} cells passed, {len(r['failed'])} failed "
              f"({r['seconds']:.0f} s) {status}")
        if r["error"]:
            print(r["error"])
            bad += 1
        for name, where, lines in r["failed"]:
            bad += 1
            print(f"  {where}::{name}")
            for line in lines:
                print(f"      {line[:140]}")
    print(f"\nportability check: {len(names)} environment(s), {bad} failure(s), "
          f"{time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
