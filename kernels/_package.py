"""The package `ligerfx.kernels`: the Triton kernels and the `liger::` torch ops that wrap them.

This file is the package's __init__ under another name (ligerfx/_imports.py says why).
"""
