"""Errors a user can cause. The CLI prints their message alone (no traceback) and exits non-zero."""

from __future__ import annotations


class LmdistillError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code: int = 2


class ConfigError(LmdistillError):
    """A config file or a command-line override is invalid."""


class DataError(LmdistillError):
    """A dataset is missing, empty, malformed or lacks a needed column."""


class ModelLoadError(LmdistillError):
    """A model or tokenizer could not be found or loaded."""


class VocabMismatchError(LmdistillError):
    """Teacher and student tokenizers differ, so their distributions cannot be compared position by position."""


class CheckpointError(LmdistillError):
    """A checkpoint is missing, incomplete or from an incompatible version."""


class CacheError(LmdistillError):
    """A soft-label cache is corrupt, truncated or does not match the student's data/tokenizer/settings."""


class AssetError(LmdistillError):
    """The embedded default (teacher GGUF, Wikipedia text) is not installed."""


class TeacherAPIError(LmdistillError):
    """An OpenAI-compatible teacher endpoint is unreachable or refused the request."""
