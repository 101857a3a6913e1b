"""Threads for the numerical backends: one BLAS thread per worker, work split explicitly.

NumPy and SciPy each bundle their own OpenBLAS, and each keeps a pool of threads that spin for
a while after every call. Run back to back (a NumPy product, then a SciPy eigensolver or ARPACK
step), the two pools fight over the same cores. On this project's 2-core machine that made the
Cholesky certificates of ``fft-circulant`` 3-5x slower, ARPACK top-k in ``exact`` 1.5-2.6x
slower and ``toeplitz`` 1.1-2x slower than with one BLAS thread. So the backends run their
LAPACK and ARPACK work on one BLAS thread and get their parallelism from worker threads over
independent pieces (NumPy's batched linear algebra releases the GIL).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def default_threads() -> int:
    """Worker threads for a backend's parallel pieces: the cores, at most 8."""
    return min(os.cpu_count() or 1, 8)


def one_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """A context in which every BLAS library in the process runs one thread per call.

    Without threadpoolctl (a dependency, but only speed relies on it) nothing changes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # only speed depends on it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def in_threads(calls: Sequence[Callable[[], T]], threads: int) -> list[T]:
    """The results of ``calls`` (functions of no argument), in order, run on up to ``threads``
    worker threads that take them in list order as they come free. Meant for NumPy work that
    releases the GIL; the caller decides how many BLAS threads each gets."""
    if threads <= 1 or len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(min(threads, len(calls))) as pool:
        return list(pool.map(lambda call: call(), calls))
