"""Tensor parallelism over a 1-D mesh of devices (axis "tp"), Megatron-style: local devices, or
those of several processes under `jax.distributed` (`jaxinfer/distributed.py`).

Which device holds what (`shard_model`):
- q/k/v projections column-parallel by head, o_proj row-parallel by the same heads; gate/up
  column-parallel, down_proj row-parallel. The KV cache is sharded by KV head. With fewer KV heads
  than devices (size % num_kv_heads == 0), each KV head is replicated on the size / num_kv_heads
  devices whose query heads read it: k/v weights and cache hold `size` heads, one per device.
- Embedding and LM head vocab-parallel (split by vocabulary entry) when the vocabulary divides by
  the size and the head is no K-quant byte stack, else replicated; norms replicated. Each device
  looks up the tokens of its range (the others' rows count zero: an all-reduce sums them) and
  computes its range of logits; the logits are gathered whole before sampling.
- Quantized weights are split in their "kn" form (scales and mins follow their columns, or their
  groups of rows: a row-parallel split falls on group boundaries), then each device's piece is laid
  out for the native CPU kernels on its own (`quant.native_layout`), as a one-device load of that
  piece would lay it out.

The step (`jit_step`) is one jitted SPMD program: the model runs under `jax.shard_map`, so every
kernel (native CPU custom calls, Pallas, XLA) sees one device's local shapes; the only collectives
are the two all-reduces of each layer (`models.llama.all_reduce`, after o_proj and down_proj), the
embedding's all-reduce and the logits' all-gather. Sampling runs on whole logits rows outside the
shard_map; the caches are donated.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinfer.config import ModelConfig
from jaxinfer.models.llama import PROJECTIONS, ROW_PARALLEL
from jaxinfer.quant import Linear, native_layout
from jaxinfer.sampling import MAX_LOGPROBS, sample
from kernels_pallas import quant_matmul as qmm

AXIS = "tp"
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output columns
# ROW_PARALLEL (o_proj, down_proj): split by input rows, outputs summed over devices
CACHE_SPEC = P(None, AXIS)  # [layers, kv_heads, pages, page_size, head_dim] by KV head


def make_mesh(size: int, devices=None) -> Mesh:
    """A 1-D mesh over `devices` (`size` of them: a data-parallel replica's), by default the first
    `size` local devices; across several processes (`jax.distributed`), over the first
    size / process_count devices of each process, in process order."""
    processes = jax.process_count()
    if devices is None and processes > 1:
        if size % processes:
            raise ValueError(f"tensor_parallel_size {size} does not divide over {processes} processes: the model "
                             f"is split over the same number of devices on every process, so the size is a "
                             f"multiple of the process count")
        per_process = size // processes
        local = jax.local_device_count()
        if per_process > local:
            raise ValueError(f"tensor_parallel_size {size} over {processes} processes needs {per_process} devices "
                             f"on each, but process {jax.process_index()} sees {local}")
        devices = [d for p in range(processes) for d in sorted((d for d in jax.devices() if d.process_index == p),
                                                                 key=lambda d: d.id)[:per_process]]
    if devices is not None:
        return Mesh(np.array(devices), (AXIS,))
    devices = jax.local_devices()
    if size > len(devices):
        raise ValueError(f"tensor_parallel_size {size} needs {size} devices, but only {len(devices)} "
                         f"{devices[0].platform} device(s) are visible (on a CPU, "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={size} makes more)")
    return Mesh(np.array(devices[:size]), (AXIS,))


def check_model(config: ModelConfig, size: int) -> None:
    """Whether `config`'s heads and MLP split over `size` devices; a ValueError saying why not."""
    c = config
    problems = []
    if c.num_heads % size:
        problems.append(f"its {c.num_heads} attention heads do not divide by {size}")
    if c.num_kv_heads % size and size % c.num_kv_heads:
        problems.append(f"its {c.num_kv_heads} KV heads neither divide by {size} nor divide {size} "
                        f"(fewer KV heads than devices are replicated, {size} a multiple of them)")
    if c.intermediate_size % size:
        problems.append(f"its intermediate size {c.intermediate_size} does not divide by {size}")
    if problems:
        raise ValueError(f"tensor_parallel_size {size} does not fit {c.name or 'the model'}: "
                         f"{'; '.join(problems)}")


def local_config(config: ModelConfig, size: int) -> ModelConfig:
    """The model as one device sees it: its share of the query heads, KV heads and MLP columns."""
    return dataclasses.replace(config, num_heads=config.num_heads // size,
                               num_kv_heads=max(1, config.num_kv_heads // size),
                               intermediate_size=config.intermediate_size // size)


def cache_kv_heads(config: ModelConfig, size: int) -> int:
    """KV heads of the whole sharded cache: the model's, or one per device when they are replicated."""
    return max(config.num_kv_heads, size)


def shard_model(model, mesh: Mesh, *, native_layouts: bool, integer: bool = True):
    """(graphdef, state, specs, vocab_parallel) of `model` split over `mesh`: the graphdef of one
    device's shard (its `local_config`, layouts and feature counts), the global state placed on the
    mesh, the PartitionSpec of every state leaf, and whether the embedding and LM head are split by
    vocabulary entry (`vocab_parallel`). `native_layouts`: lay out each quantized piece for the
    native CPU kernels. `model` itself is left as it is."""
    size = mesh.shape[AXIS]
    c = model.config
    graphdef, state = nnx.split(model)
    local = nnx.merge(graphdef, state)  # a second module tree over the same arrays, to re-shape
    specs = {}  # path of a leaf (names) -> PartitionSpec; every other leaf is replicated
    for proj in PROJECTIONS:
        node = getattr(local.layers, proj)
        if proj in ROW_PARALLEL and node.b is not None:
            raise ValueError(f"{proj}: a row-parallel projection with a bias is not supported")
        split = functools.partial(_split, proj, node=node, c=c, size=size)
        for name, spec in _shard_linear(node, split, proj in COLUMN_PARALLEL, native_layouts, integer).items():
            specs["layers", proj, name] = spec
    local.config = local_config(c, size)
    local.tp_axis = AXIS
    local.vocab_parallel = vocab_parallel(model, size)
    if local.vocab_parallel:
        local.config = dataclasses.replace(local.config, vocab_size=c.vocab_size // size)
        for name in ("embed", "lm_head"):  # [vocab, hidden] tables (or the embedding's stored rows)
            if isinstance(getattr(local, name), nnx.Param):
                specs[name,] = P(AXIS)
        if isinstance(local.lm_head, Linear):  # [hidden, vocab], quantized: split like a column-parallel projection
            def split_head(name, leaf):
                step = leaf.shape[-1] // size
                return [leaf[..., d * step:(d + 1) * step] for d in range(size)]
            for name, spec in _shard_linear(local.lm_head, split_head, True, native_layouts, integer).items():
                specs["lm_head", name] = spec
    graphdef, state = nnx.split(local)

    def spec_of(path, _):
        names = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
        return next((specs[names[:n]] for n in (3, 2, 1) if names[:n] in specs), P())

    specs_tree = jax.tree_util.tree_map_with_path(spec_of, state)
    state = put(state, shardings(mesh, specs_tree))
    return graphdef, state, specs_tree, local.vocab_parallel


def vocab_parallel(model, size: int) -> bool:
    """Whether the embedding and LM head split by vocabulary entry: the vocabulary divides by
    `size`, and the head is no K-quant byte stack (those are not split); else both are replicated."""
    head = model.lm_head
    return model.config.vocab_size % size == 0 and not (isinstance(head, Linear) and head.layout == "kquant")


def _shard_linear(node, split, column: bool, native_layouts: bool, integer: bool) -> dict:
    """Splits one Linear (a layer stack or a single weight) in place: `split(leaf name, "kn" leaf)`
    gives each device's piece, or None for a leaf every device holds whole. Each piece is laid out
    as a one-device load of it would be, and the pieces concatenated on the axis that is then
    sharded: device d's block is its piece, unchanged. Returns {leaf name: PartitionSpec}."""
    leaves = _kn_leaves(node)
    parts = {name: split(name, leaf) for name, leaf in leaves.items()}
    if column:
        node.out_features = parts["w"][0].shape[-1]  # this device's columns ("kn" pieces)
    else:
        node.in_features = node.in_features // len(parts["w"])
    stack = parts["w"][0].ndim - 2  # leading layer axes
    layout = "kn"
    if native_layouts and node.fmt is not None:
        converted = [native_layout(node.fmt, piece, integer) for piece in parts["w"]]
        layout, parts["w"] = converted[0][0], [data for _, data in converted]
    specs = {}
    for name, pieces in parts.items():
        if pieces is None:  # the same on every device (per-channel scales of a row split)
            specs[name] = P()
            continue
        # the blocks-of-columns axis of a native layout; else "kn"'s columns (column) or rows (row)
        axis = stack if name == "w" and layout != "kn" else (-1 if column else -2)
        axis %= pieces[0].ndim
        setattr(node, name, nnx.Param(jnp.concatenate(pieces, axis=axis)))
        specs[name] = P(*([None] * axis), AXIS)
    if node.fmt is not None:
        node.layout = layout
    return specs


def put(tree, shardings):
    """`jax.device_put(tree, shardings)`, each process placing only its own devices' shards (every
    process holds the whole value): under jax.distributed, device_put would first check that the
    processes agree by gathering every array."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]), tree, shardings)


def shardings(mesh: Mesh, specs):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def _kn_leaves(node) -> dict:
    """A projection's arrays in the "kn" layout: {"w", ("scales", "mins",) ("b")}, each [layers, ...]."""
    leaves = {}
    if node.fmt is None:
        leaves["w"] = node.w[...]
    elif node.layout == "kquant":
        raise ValueError("GGUF K-quant byte stacks are not split for tensor parallelism (the engine loads "
                         "them as int8 instead)")
    else:
        w = node.quantized_weight()
        leaves.update(w=w.kn_data(), scales=w.scales)
        if w.mins is not None:
            leaves["mins"] = w.mins
    if node.b is not None:
        leaves["b"] = node.b[...]
    return leaves


def _split(proj, name, leaf, *, node, c: ModelConfig, size: int):
    """Each device's piece of one "kn" leaf (a list), or None when every device holds all of it."""
    if proj in ROW_PARALLEL:
        grouped = node.fmt is not None and node.fmt.group_size
        if name in ("scales", "mins") and not grouped:
            return None  # one per output column: a row split leaves them whole
        if name == "w" and node.fmt is not None and node.fmt.kind in qmm.HIGH_BITS:
            return _split_high_bits(proj, leaf, node, size)
        rows = leaf.shape[-2]  # K, K / 2 packed int4, or K / group_size for group scales
        if rows % size:
            raise ValueError(f"tensor_parallel_size {size}: {proj}'s {node.in_features} input rows do not split "
                             f"into {size} equal parts on its format's boundaries ({node.fmt.name if node.fmt else 'full precision'})")
        step = rows // size
        return [leaf[..., d * step:(d + 1) * step, :] for d in range(size)]
    if proj in ("k_proj", "v_proj") and c.num_kv_heads < size:  # each device gets the one KV head it reads
        per_head = size // c.num_kv_heads
        return [leaf[..., (d // per_head) * c.head_dim:(d // per_head + 1) * c.head_dim] for d in range(size)]
    step = leaf.shape[-1] // size
    return [leaf[..., d * step:(d + 1) * step] for d in range(size)]


def _split_high_bits(proj, data, node, size: int) -> list:
    """Each device's piece of int5/int6 `data` [*stack, K / 2 + high rows, N] split by input rows:
    the codes unpacked and packed again per piece, whose high-bit bands start at its own row 0; one
    layer at a time (`lax.map`), in jax.numpy so that an abstract split (the deviceless compile) traces it."""
    fmt, k = node.fmt.kind, node.in_features
    if k % size or (k // size) % 128:
        raise ValueError(f"tensor_parallel_size {size}: {proj}'s {k} input rows do not split into {size} "
                         f"parts of a multiple of 128 rows ({node.fmt.name})")
    step = k // size

    def repack(layer):  # [K / 2 + high rows, N] -> one per device
        codes = qmm.unpack_high_bits(layer, fmt, k)
        return tuple(qmm.pack_high_bits(codes[d * step:(d + 1) * step], fmt, xp=jnp) for d in range(size))

    stack = data.shape[:-2]
    pieces = jax.lax.map(repack, jnp.asarray(data).reshape(-1, *data.shape[-2:]))
    return [piece.reshape(*stack, *piece.shape[-2:]) for piece in pieces]


def jit_step(graphdef, mesh: Mesh, state_specs, vocab_parallel: bool):
    """`runner.jit_step`'s program for a model split over `mesh`, the same inputs and outputs: the
    state and caches sharded as `shard_model` and `CACHE_SPEC` say, everything else replicated."""

    def forward(state, k_cache, v_cache, token_ids, positions, meta):
        model = nnx.merge(graphdef, state)
        return model(token_ids, positions, k_cache, v_cache, meta)

    # check_vma off: the native CPU kernels are custom calls with no replication rule; the model
    # keeps the invariant itself (activations are whole after each all-reduce).
    logits_spec = P(None, AXIS) if vocab_parallel else P()  # [S, vocab]: by entry, or whole on every device
    sharded_forward = jax.shard_map(forward, mesh=mesh, in_specs=(state_specs, CACHE_SPEC, CACHE_SPEC, P(), P(), P()),
                                    out_specs=(logits_spec, CACHE_SPEC, CACHE_SPEC), check_vma=False)
    replicated, cache = NamedSharding(mesh, P()), NamedSharding(mesh, CACHE_SPEC)

    def engine_step(state, k_cache, v_cache, token_ids, positions, meta, sampling, history, num_prompt,
                    token_bitmask):
        logits, k_cache, v_cache = sharded_forward(state, k_cache, v_cache, token_ids, positions, meta)
        logits = jax.lax.with_sharding_constraint(logits, replicated)  # sampling sees whole rows (an all-gather)
        return sample(logits, sampling, history, num_prompt, MAX_LOGPROBS, token_bitmask), k_cache, v_cache

    return jax.jit(engine_step, donate_argnums=(1, 2),
                   in_shardings=(shardings(mesh, state_specs), cache, cache) + (replicated,) * 7,
                   out_shardings=(replicated, cache, cache))
