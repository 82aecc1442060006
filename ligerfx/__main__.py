"""`python -m ligerfx ...` is the `ligerfx` command."""

import sys

from .tools.cli import main

sys.exit(main())
