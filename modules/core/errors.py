"""The error base class every stage reports as one line, and the one helper that makes that line."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of the errors the stage scripts report as one line, without a traceback."""


def error_line(error: BaseException) -> str:
    """The first line of an exception message, whitespace collapsed (torch and h5py errors can
    span a page); the exception's type name when the message is empty."""
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    return text or type(error).__name__
