"""Assertions shared by the tests of one-line errors."""

from __future__ import annotations

from typing import Callable

import pytest


def one_line_error(call: Callable[[], object], error_type: type[Exception]) -> str:
    """The message of the ``error_type`` that ``call()`` raises, after checking it is one line."""
    with pytest.raises(error_type) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message
