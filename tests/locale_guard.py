"""A context manager for tests that write DICOM with SimpleITK/GDCM.

GDCM's writer leaves the process's C locale at "C" (seen with SimpleITK 2.x), which turns Python's default
text encoding into ASCII for every later test of the session; ``restoring_locale`` puts the locale back.
Imported as ``from locale_guard import restoring_locale`` (the tests folder is on ``sys.path`` through its
``conftest.py``).
"""

from __future__ import annotations

import contextlib
import locale
from collections.abc import Iterator


@contextlib.contextmanager
def restoring_locale() -> Iterator[None]:
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
