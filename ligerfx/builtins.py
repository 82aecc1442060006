"""The patterns a compile uses: the built-in families (the `ligerfx.patterns` package) and pattern
plugins, registered once on first import of this module, and the ones the options enable."""

import ligerfx.patterns  # noqa: F401  - each module there registers its patterns on import

from .compiler.pattern import REGISTRY, Pattern
from .plugins import load_plugins

load_plugins()


def enabled_patterns(options) -> list[Pattern]:
    """Every registered pattern (built-in, plugin or the user's) that `options` enables, highest
    priority first."""
    pats = REGISTRY.ordered()
    if options.patterns is not None:
        pats = [p for p in pats if p.name in options.patterns]
    return [p for p in pats if p.name not in options.exclude]
