"""asla: atomic structure search by reinforcement learning (ASLA)."""
from __future__ import annotations

__version__ = "0.1.0"

import os as _os

# Calculators (tblite, GPAW, numpy BLAS) run fastest single-threaded on small cells, and threads
# oversubscribe the cores the network trains on (torch sets its own count: `torch_threads`).
# Measured: tblite on a random C6H6 took 2 s with default threads on a busy machine, 15 ms with one.
# Set these variables yourself before importing asla to choose otherwise.
_chosen = any(v in _os.environ for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"))
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
if not _chosen and "numpy" in __import__("sys").modules:
    # numpy came first, so its BLAS already started its threads: limit them now. Measured: a 10-step BFGS reward
    # on pd100-oxide-3x3 took 1.7 s with two BLAS threads on a loaded machine, 50 ms with one.
    from threadpoolctl import threadpool_limits as _limits
    _limits(limits=1, user_api="blas")

from .errors import AslaError, CalculatorError, CheckpointError, ConfigError, ProblemError  # noqa: E402 - after the thread limits
from .problem import Problem, list_problems, load_problem  # noqa: E402 - after the thread limits

__all__ = ["envs", "AslaError", "CalculatorError", "CheckpointError", "ConfigError", "Problem", "ProblemError",
           "list_problems", "load_problem", "__version__"]

# Gymnasium ids asla/<problem>-v0 exist as soon as asla is imported, as `gymnasium.make` users expect.
from . import envs as envs  # noqa: E402 - registers the Gymnasium ids once asla is importable
