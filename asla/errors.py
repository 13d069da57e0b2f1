"""Errors a user can act on: each names the offending field and what is allowed."""
from __future__ import annotations


class AslaError(Exception):
    """Base class: every message is one line a user can act on."""


class ProblemError(AslaError, ValueError):
    """A problem definition (YAML or dict) is invalid."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class CalculatorError(AslaError, RuntimeError):
    """The energy calculator raised, returned a non-finite value or timed out."""


class CheckpointError(AslaError, ValueError):
    """A checkpoint is corrupt, foreign or does not fit the problem."""


class ConfigError(AslaError, ValueError):
    """A training recipe is invalid."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")
