"""Imported first by every stage script, and only by them: library caches go into the project root
(``core.library_caches``) and the noisy third-party warnings are hidden (``core.console``; not with
``--verbose``) before any third-party library is imported."""

import sys

from modules.core.console import filter_noisy_warnings
from modules.core.library_caches import point_library_caches_from

point_library_caches_from(sys.argv[1:])
filter_noisy_warnings("--verbose" in sys.argv[1:])
