"""pytest settings shared by the notebooks (run by nbval) and tests/.

NumPy's matrix library, OpenBLAS, starts one thread per core. This book's matrices are small,
and on a 2-core machine that is busy with other work the two threads mostly wait for each
other: benchmarks/benchmark.py measured one training step of the reference model at 12.9 ms
with the default threads against 3.6 ms with one (batch 32; 171 ms against 25 ms at batch
256). With this machine's OpenBLAS kernel (SkylakeX) chapter 5's training run gives
bit-identical parameters either way; with others (Haswell) two threads change the last bits,
which is why tools/portability.py also runs 2-thread environments. The test suite runs NumPy
single-threaded. The Jupyter kernels that nbval starts and the command-line
tests' subprocesses inherit the setting; set OPENBLAS_NUM_THREADS yourself to override it.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
