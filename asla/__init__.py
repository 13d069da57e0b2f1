"""asla: atomic structure search by reinforcement learning (ASLA)."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import AslaError, CalculatorError, CheckpointError, ConfigError, ProblemError  # noqa: E402
from .problem import Problem, list_problems, load_problem  # noqa: E402

__all__ = ["AslaError", "CalculatorError", "CheckpointError", "ConfigError", "Problem", "ProblemError",
           "list_problems", "load_problem", "__version__"]
