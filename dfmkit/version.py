"""dfmkit's version: the installed distribution's, or ``0+unknown`` in a source tree that is not installed.

Its own module so that library modules can name the version without importing the ``dfmkit`` package.
"""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("dfmkit")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
