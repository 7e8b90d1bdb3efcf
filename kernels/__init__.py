"""Triton kernels with their torch references."""
