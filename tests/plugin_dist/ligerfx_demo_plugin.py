"""A pattern plugin used by tests/test_register_pattern.py (installed only on a test's sys.path).

Its dist-info next to it declares two `ligerfx.patterns` entry points: `demo`, this module's
`register` function, and `broken`, which names a function that does not exist (a plugin that
fails to load must only warn).
"""

import torch

import ligerfx

NAME = "demo_plugin_tanh_gate"


def pattern(x):
    """x * tanh(x), from the demo plugin."""
    return x * torch.tanh(x)


def replacement(x):
    return torch.tanh(x) * x


def register():
    ligerfx.register_pattern(NAME, pattern, replacement, (torch.randn(4, 8),), replace=True)
