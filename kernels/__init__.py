"""Triton kernels and the `liger::` torch ops that wrap them (installed as ligerfx.kernels)."""
