"""The error base class every stage reports as one line, and the helpers that make that line."""

from __future__ import annotations

import os


class PipelineError(Exception):
    """Base class of the errors the stage scripts report as one line, without a traceback."""


def error_line(error: BaseException) -> str:
    """The first line of an exception message, whitespace collapsed (torch and h5py errors can
    span a page); the exception's type name when the message is empty."""
    lines = str(error).strip().splitlines()
    text = " ".join(lines[0].split()) if lines else ""
    return text or type(error).__name__


def printable(text: str) -> str:
    """``text`` with the bytes of a name that is not UTF-8 shown as ``\\xNN`` escapes. Python keeps
    such file names as surrogate escapes, which no UTF-8 message, CSV or JSON can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text
