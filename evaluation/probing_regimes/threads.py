"""Thread limits around the probes' fits, set by saeflow itself (not by the caller's shell).

Every probe fits a small model: at most 1,024 rows x d_model (576 for SmolLM2-135M) for the
baselines, 1,024 x 128 latents for the SAE probes. On such sizes a second BLAS or OpenMP
thread costs more than it gains: OpenBLAS's workers spin between the thousands of matrix-vector
products of an lbfgs fit, and on a 2-core machine under load each product waits for a
descheduled peer. Measured here (bench/bench_probe.py, 924 x 576 float64, X @ w and X.T @ g, at
load ~8 on 2 cores): 24 ms wall / 5.1 ms CPU per pair with OpenBLAS's default 2 threads, 1.2 ms
wall / 0.2 ms CPU with 1. That gap, not the probes' grids, was why the README's probe command
took > 20 min unless the shell happened to set ``OMP_NUM_THREADS=1``.

:func:`fit_threads` limits BLAS and OpenMP (scikit-learn's, torch's) to
:func:`fit_thread_limit` threads for the duration of a fit; the previous limits come back on
exit, so the LM's harvest (torch, large matrices) keeps its threads. The limit is 1 unless
``SAEFLOW_PROBE_FIT_THREADS`` says otherwise (an integer, or ``none`` to leave the libraries
as they are: the reference path of bench/bench_probe.py). Thread counts do not change a
method or its grid; they can move the last bits of a BLAS sum, and with them an lbfgs or saga
fit stopped at its iteration cap (see the README's before/after ΔAUC table).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController  # installed with scikit-learn, a dependency

FIT_THREADS_ENV = "SAEFLOW_PROBE_FIT_THREADS"
DEFAULT_FIT_THREADS = 1


def fit_thread_limit() -> int | None:
    """Threads per BLAS / OpenMP library during a fit: ``$SAEFLOW_PROBE_FIT_THREADS`` (an
    integer ≥ 1, or ``none`` for no limit), default 1. ValueError on anything else."""
    raw = os.environ.get(FIT_THREADS_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_FIT_THREADS
    if raw == "none":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{FIT_THREADS_ENV}={raw!r}: expected an integer ≥ 1 or 'none'")
    return value


_controller: ThreadpoolController | None = None
_active: list[int] = []  # the limits of the enclosing fit_threads blocks


def _thread_controller() -> ThreadpoolController:
    # Finding the loaded libraries costs 30-120 ms here (threadpool_limits does it on every
    # entry); found once, a limit costs ~0.1 ms. Made on first use, after this package's
    # imports have loaded numpy's, scipy's, scikit-learn's and torch's libraries.
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller


@contextmanager
def fit_threads(limit: int | None | str = "env") -> Iterator[None]:
    """Limit BLAS and OpenMP threads to ``limit`` inside the block (``"env"``: from
    :func:`fit_thread_limit`; None: no limit). Inside a block with the same limit, a no-op."""
    resolved = fit_thread_limit() if limit == "env" else limit
    if resolved is None or (_active and _active[-1] == resolved):
        yield
        return
    with _thread_controller().limit(limits=resolved):
        _active.append(int(resolved))
        try:
            yield
        finally:
            _active.pop()
