"""GPU kernels as Pallas programs, each beside its plain `jax.numpy` reference.

`kernels_pallas.dispatch` is the one place that picks which implementation runs.
"""
