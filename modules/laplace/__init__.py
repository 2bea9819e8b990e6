"""Laplace posteriors (laplace-torch) over the head's last layer and over SAM's mask decoder.

Importing laplace-torch imports its curvature backends, one of which calls ``torch.jit.script`` at
import time; torch 2.14 answers with a ``FutureWarning`` on stderr that a user cannot act on and
that would break the stages' "one line on stderr" for errors. That one warning is silenced here,
before any module of this package imports laplace-torch; every other warning still shows.
"""

import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
