"""GPU kernels as Pallas programs, each beside its plain `jax.numpy` reference.

This package imports nothing from `jaxinfer` or `kernels_cpu`; `jaxinfer.ops` picks which
implementation runs.
"""
