"""`python -m ligerfx ...` is the `ligerfx` command."""

import sys

from .cli import main

sys.exit(main())
