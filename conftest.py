"""pytest loads this before any test module: NumPy's BLAS runs on one thread unless the user set
a thread count, because OpenBLAS threads only spin on these small matrices (and on a busy
machine they made the suite several times slower)."""
import os

for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")
