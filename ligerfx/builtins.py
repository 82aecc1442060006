"""Loads the built-in patterns (the `ligerfx.patterns` package) and pattern plugins, once, on first use."""

import ligerfx.patterns  # noqa: F401  - each module there registers its patterns on import

from .plugins import load_plugins

load_plugins()
