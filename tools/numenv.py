"""The numerical environments one machine can imitate (used by tools/portability.py and
benchmarks/recipes.py).

Three knobs change the last bits of floating-point results without changing the code:

- OPENBLAS_CORETYPE picks OpenBLAS's matrix kernel. Older kernels (Haswell: AVX2,
  Sandybridge: AVX, Nehalem: SSE) run on newer CPUs, so one machine can imitate older ones.
  OPENBLAS_L2_SIZE, set on some machines, is removed together with it.
- NPY_DISABLE_CPU_FEATURES lowers the SIMD level of NumPy's own loops (exp, sum, ...): one
  level below the CPU's highest, or down to X86_V2 (SSE4.2, the baseline of NumPy's wheels).
- OPENBLAS_NUM_THREADS: 1 (what the tests use) or 2 (a reader's default on 2 cores).
"""

from __future__ import annotations

import ast
import functools
import os
import platform
import subprocess
import sys

# NumPy's AVX-512 levels, highest first: disabling X86_V4 needs the ones above it off too.
_AVX512_LEVELS = ("AVX512_SPR", "AVX512_ICL", "X86_V4")


@functools.cache
def npy_features() -> dict[str, bool]:
    """NumPy's CPU features on this machine (True: found and enabled)."""
    out = subprocess.run(
        [sys.executable, "-c", "from numpy._core._multiarray_umath import "
         "__cpu_features__ as f; print(repr(dict(f)))"],
        capture_output=True, text=True, check=True, env=base_env())
    return ast.literal_eval(out.stdout)                   # a dict literal NumPy printed


def top_simd_disable() -> str:
    """NPY_DISABLE_CPU_FEATURES value that removes the highest x86 level this CPU has
    (e.g. "AVX512_ICL X86_V4" on an AVX-512 machine, "X86_V3" on an AVX2 one); "" if none.
    """
    found = npy_features()
    if found.get("X86_V4"):
        return " ".join(name for name in _AVX512_LEVELS if found.get(name))
    if found.get("X86_V3"):
        return "X86_V3"
    return ""


def v2_simd_disable() -> str:
    """NPY_DISABLE_CPU_FEATURES value that lowers NumPy to X86_V2 (its baseline): the
    AVX-512 levels and X86_V3 off (e.g. "AVX512_ICL X86_V4 X86_V3"); "" if the CPU has no
    level above X86_V2.
    """
    found = npy_features()
    if not found.get("X86_V3"):
        return ""
    return " ".join([*(name for name in _AVX512_LEVELS if found.get(name)), "X86_V3"])


def base_env() -> dict[str, str]:
    """This process's environment without the three knobs."""
    env = dict(os.environ)
    for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NPY_DISABLE_CPU_FEATURES",
                "OPENBLAS_NUM_THREADS"):
        env.pop(key, None)
    return env


def environments() -> dict[str, dict[str, str]]:
    """Name -> the variables that make it. 'native' is what the machine picks by itself.

    The default portability matrix: native with 1 and 2 threads, and the Haswell and
    Sandybridge kernels with NumPy's highest SIMD level switched off, with 1 and 2 threads;
    Nehalem (SSE only) as an extra. Then NumPy lowered to X86_V2, as on a CPU without AVX2
    (`-v2` in the name): with the Sandybridge kernel and 2 threads, and with Nehalem and 1
    thread (a machine from before AVX). On a CPU whose highest level is already X86_V3 the
    first group is at X86_V2 and the `-v2` environments would repeat it, so they are left out.
    """
    envs = {"native-1t": {"OPENBLAS_NUM_THREADS": "1"},
            "native-2t": {"OPENBLAS_NUM_THREADS": "2"}}
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return envs                               # the x86 kernels below need an x86 CPU
    found = npy_features()
    simd = top_simd_disable()
    extra = {"NPY_DISABLE_CPU_FEATURES": simd} if simd else {}
    # each kernel runs only on a CPU with its instructions: AVX2 (and FMA), AVX, SSE4.2
    kernels = [("Haswell", found.get("X86_V3")), ("Sandybridge", found.get("AVX")),
               ("Nehalem", found.get("SSE42"))]
    for kernel, runs in kernels:
        for threads in ("1", "2") if kernel != "Nehalem" else ("1",):
            if runs:
                envs[f"{kernel.lower()}-{threads}t"] = {
                    "OPENBLAS_CORETYPE": kernel, "OPENBLAS_NUM_THREADS": threads, **extra}
    v2 = v2_simd_disable()
    if v2 and v2 != simd:
        for kernel, threads, runs in (("Sandybridge", "2", found.get("AVX")),
                                      ("Nehalem", "1", found.get("SSE42"))):
            if runs:
                envs[f"{kernel.lower()}-v2-{threads}t"] = {
                    "OPENBLAS_CORETYPE": kernel, "OPENBLAS_NUM_THREADS": threads,
                    "NPY_DISABLE_CPU_FEATURES": v2}
    return envs


def env_for(name: str) -> dict[str, str]:
    """The full process environment for the environment called `name`."""
    envs = environments()
    if name not in envs:
        raise SystemExit(f"unknown environment {name!r}; choose from {', '.join(envs)}")
    return {**base_env(), **envs[name]}


def describe(env: dict[str, str]) -> str:
    """What an environment really loads: OpenBLAS kernel, threads, NumPy SIMD levels."""
    code = ("import threadpoolctl, numpy\n"
            "from numpy._core._multiarray_umath import __cpu_features__ as f\n"
            "b = [i for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'][0]\n"
            "lv = [k for k in ('X86_V2', 'X86_V3', 'X86_V4', 'AVX512_ICL') if f.get(k)]\n"
            "print(f\"OpenBLAS {b['architecture']}, {b['num_threads']} thread(s), \"\n"
            "      f\"NumPy SIMD up to {lv[-1] if lv else 'baseline'}\")\n")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True)
        return out.stdout.strip()
    except subprocess.CalledProcessError as e:              # threadpoolctl missing, ...
        return f"(could not inspect: {e.stderr.strip().splitlines()[-1]})"
