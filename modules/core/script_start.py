"""Imported first by every stage script, and only by them: library caches go into the project root
(``core.library_caches``) before any third-party library is imported."""

import sys

from modules.core.library_caches import point_library_caches_from

point_library_caches_from(sys.argv[1:])
