"""Loads the built-in patterns (the `ligerfx.patterns` package) once, on first use."""

import ligerfx.patterns  # noqa: F401  - each module there registers its patterns on import
