"""Helpers shared by the tests."""

import jax
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_cuda(fn, *args, device_kind="NVIDIA H100"):
    """`jax.export` of `jax.jit(fn)` for CUDA on this GPU-less machine: the Pallas lowering runs as
    it would on a GPU. Since jax 0.12 that needs an abstract GPU device to lower for."""
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None,
                                                                      platform="gpu"))
    with use_abstract_mesh(mesh):
        return jax.export.export(
            jax.jit(fn), platforms=["cuda"],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
