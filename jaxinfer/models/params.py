"""A checkpoint's weights into a layer-stacked model (`models/llama.py`, or one built like it): the
format of each projection (full precision, requantized, or the file's own blocks), each stacked
parameter read layer by layer into one host buffer, and the converted-weight cache.
"""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxinfer import kquant, quant
from jaxinfer.config import ModelConfig, UnsupportedModelError
from jaxinfer.models.llama import _LAYER_TENSORS, PROJECTIONS, ROW_PARALLEL, Llama
from jaxinfer.quant import WeightFormat
from jaxinfer.weights.cache import WeightCache

logger = logging.getLogger("jaxinfer")


def projection_formats(config: ModelConfig, checkpoint, quantization: str = "none",
                       group_size: int | None = None, kquants: bool = False,
                       grouped: bool = False, row_split: int = 1) -> dict[str, tuple[WeightFormat, bool]]:
    """projection -> (its format, whether the checkpoint holds it in that format already).

    `quantization`: "none" (empty: all full precision), "native" (what a GGUF file carries: its
    Q8_0/Q4_0/Q4_1 blocks as they are, with `kquants` also its Q4_K/Q5_K/Q6_K, Q5_0/Q5_1 and
    projections mixing types (`kquant_formats`), with `grouped` instead those in the narrowest
    grouped format that holds them exactly (`weights.gguf.group_format`: int5/int6/int8 groups, for
    the paths without byte stacks, a GPU's), float tensors in full precision, other types requantized
    to int8), or a format of `quant.QUANTIZATIONS`, which GGUF blocks of the same kind and group
    satisfy without requantization. `row_split`: tensor parallelism's size, over which the row-parallel
    projections' input rows are split (a stored format is kept where its groups fit each piece).
    """
    if quantization == "none":
        return {}
    requested = None if quantization == "native" else quant.weight_format(quantization, group_size)
    native_format = getattr(checkpoint, "native_format", lambda name: None)  # HF checkpoints: never native
    formats = {}
    kept = kquant_formats(config, checkpoint) if quantization == "native" and kquants else {}
    if kept:
        logger.info("GGUF blocks kept as stored (native byte-stack kernel): %s", "; ".join(
            f"{proj} " + ", ".join(f"{t} x{fmt.layer_types.count(t)}" for t in sorted(set(fmt.layer_types)))
            for proj, fmt in kept.items()))
    for proj in PROJECTIONS:
        if proj in kept:
            formats[proj] = (kept[proj], True)
            continue
        template = _LAYER_TENSORS[(proj, "w")][0]
        names = [template.format(layer) for layer in range(config.num_layers)]
        if hasattr(checkpoint, "stack_format"):
            stored = checkpoint.stack_format(names, grouped, row_split if proj in ROW_PARALLEL else 1)
        else:
            found = {native_format(name) for name in names}
            stored = found.pop() if len(found) == 1 else None
        if stored is not None and (requested is None or (
                stored.kind, stored.symmetric) == (requested.kind, requested.symmetric) and
                (group_size is None or group_size == stored.group_size)):
            formats[proj] = (stored, True)
            continue
        types = sorted({checkpoint.tensor_type(name) for name in names}) if hasattr(checkpoint, "tensor_type") else []
        stored_quantized = any(t not in ("F32", "F16", "BF16") for t in types)
        if requested is None and not stored_quantized:
            continue  # "native" of a full-precision tensor: full precision
        fmt = requested or quant.weight_format("int8")
        if stored_quantized:
            logger.info("%s: %s weights are dequantized and requantized to %s", proj, "/".join(types), fmt.name)
        formats[proj] = (fmt, False)
    return formats


def kquant_formats(config: ModelConfig, checkpoint) -> dict[str, WeightFormat]:
    """The projections kept as the file stores them in a byte stack (`jaxinfer.kquant`), as "kquant"
    formats: those whose layers are all of its types and hold a K-quant, a Q5_0/Q5_1, or a mix of
    types. A stack of one of Q8_0/Q4_0/Q4_1 throughout stays with `group_matmul` (`native_format`)."""
    if not hasattr(checkpoint, "kquant_tensor"):
        return {}
    c = config
    shapes = {"q_proj": (c.hidden_size, c.num_heads * c.head_dim), "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
              "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim), "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
              "gate_proj": (c.hidden_size, c.intermediate_size), "up_proj": (c.hidden_size, c.intermediate_size),
              "down_proj": (c.intermediate_size, c.hidden_size)}
    formats = {}
    for proj in PROJECTIONS:
        template = _LAYER_TENSORS[(proj, "w")][0]
        types = tuple(checkpoint.tensor_type(template.format(layer)) for layer in range(c.num_layers))
        group_matmul_runs = len(set(types)) == 1 and types[0] in ("Q8_0", "Q4_0", "Q4_1")
        if all(t in kquant.TYPES for t in types) and not group_matmul_runs and kquant.fits(*shapes[proj], types):
            formats[proj] = WeightFormat("kquant", layer_types=types)
    return formats


def head_tensor_name(config: ModelConfig) -> str:
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def load_llama(config: ModelConfig, checkpoint, **options) -> Llama:
    """A Llama-family model with the checkpoint's weights (`load_stacked`'s options)."""
    return load_stacked(Llama, _LAYER_TENSORS, config, checkpoint, **options)


def load_stacked(model_cls, layer_tensors, config: ModelConfig, checkpoint, *, dtype=jnp.float32,
                 attention_backend="auto", quantization="none", group_size=None, quant_backend="auto",
                 cache_dir=None, lm_head_quantization="none", kquants=False, grouped=False, row_split=1):
    """Builds `model_cls` (Llama or a model built like it) with the checkpoint's weights, one stacked
    parameter at a time. `layer_tensors`: parameter path in the layer -> (HF name template, transpose).

    The module is created abstractly (no memory), then each parameter is read layer by layer into
    one host buffer and moved to the device, so at most one parameter has a second copy at a time.
    Quantized projections (see `projection_formats`) are quantized one layer at a time: no
    full-precision copy of them reaches the device. With `cache_dir`, converted weights are kept
    there (orbax) and read back by later loads of the same file in the same formats.
    `lm_head_quantization` "int8" quantizes the LM head per vocabulary entry, "native" keeps a GGUF's
    Q8_0 head as stored (a tied embedding then reads its rows from it); "none" keeps it in `dtype`.
    `kquants`: "native" keeps the file's K-quant, Q5_0/Q5_1 and mixed-type projections as stored
    (where their kernel runs: `kquant_formats`); `grouped`: else in grouped formats that hold them
    exactly (`projection_formats`, with `row_split`).
    """
    _refuse_unread_biases(checkpoint)
    formats = projection_formats(config, checkpoint, quantization, group_size, kquants, grouped, row_split)
    down_order_absorbed = _absorbs_down_proj_order(formats)
    if down_order_absorbed:  # down_proj's act-order goes into gate/up's columns at load: no gather
        formats["down_proj"] = (dataclasses.replace(formats["down_proj"][0], act_order=False), True)
    if lm_head_quantization not in ("none", "int8", "native"):
        raise ValueError(f"lm_head_quantization must be none, int8 or native, got {lm_head_quantization!r}")
    head_format = quant.weight_format("int8") if lm_head_quantization == "int8" else None
    if lm_head_quantization == "native":
        head_format = _native_head_format(config, checkpoint)
    embed_type = _stored_embed_type(config, checkpoint) if quantization == "native" and kquants else None
    model = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, attention_backend=attention_backend,
                                             formats={p: f for p, (f, _) in formats.items()},
                                             quant_backend=quant_backend, head_format=head_format,
                                             embed_type=embed_type))
    graphdef, state = nnx.split(model)
    shapes = nnx.to_pure_dict(state)
    cache = None
    if cache_dir and (formats or head_format):
        key_fields = {"dtype": jnp.dtype(dtype).name,
                      "formats": {p: [f.name, native] + ([list(f.layer_types), kquant.LAYOUT_VERSION] if f.layer_types
                                                         else []) for p, (f, native) in sorted(formats.items())}}
        if head_format is not None:
            key_fields["lm_head"] = head_format.name
        if getattr(checkpoint, "quantization", None) is not None:  # the reader of the producer's format
            key_fields["checkpoint_quantization"] = checkpoint.quantization.description
        if embed_type is not None:
            key_fields["embed"] = [embed_type, kquant.LAYOUT_VERSION]
        cache = WeightCache(cache_dir, checkpoint.path, **key_fields)
        params = cache.load(shapes)
        if params is not None:
            nnx.replace_by_pure_dict(state, params)
            return nnx.merge(graphdef, state)
    params = _read_params(config, checkpoint, shapes, formats, dtype, layer_tensors, head_format, embed_type,
                          down_order_absorbed)
    if cache is not None:
        cache.save(params)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# Biases no model here reads (a Llama or Qwen3 config with attention_bias gives o_proj one too; only
# Qwen2's q/k/v biases are read): a checkpoint holding one is refused rather than run without it.
_UNREAD_BIASES = ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _refuse_unread_biases(checkpoint) -> None:
    has = getattr(checkpoint, "has", None)
    for proj in _UNREAD_BIASES if has is not None else ():
        name = f"model.layers.0.{proj}.bias"
        try:
            present = has(name)
        except KeyError:  # a GGUF architecture with no name for it
            present = False
        if present:
            raise UnsupportedModelError(f"{getattr(checkpoint, 'path', 'the checkpoint')}: it has {name}, a bias this engine does "
                                        "not apply (it reads q/k/v biases only)")


def _native_head_format(config: ModelConfig, checkpoint) -> WeightFormat:
    """The LM head as stored: Q8_0 blocks, or (a head not tied to the embedding) a byte-stack type."""
    name = head_tensor_name(config)
    head_format = getattr(checkpoint, "native_format", lambda name: None)(name)
    if head_format is not None and head_format.kind == "int8":
        return head_format
    stored = checkpoint.tensor_type(name) if hasattr(checkpoint, "tensor_type") else None
    if (stored in kquant.TYPES and not config.tie_word_embeddings
            and kquant.fits(config.hidden_size, config.vocab_size, (stored,))):
        return WeightFormat("kquant", layer_types=(stored,))
    raise ValueError("lm_head_quantization='native' needs a checkpoint whose LM head is stored as Q8_0, or as a "
                     "K-quant and not tied to the embedding")


def _stored_embed_type(config: ModelConfig, checkpoint) -> str | None:
    """The embedding's type where it is kept as the file stores it: a block type of 32 (Qwen2.5-0.5B's
    Q5_0), not tied to the LM head (which reads it by columns). Else None: dequantized to `dtype`."""
    name = "model.embed_tokens.weight"
    stored = checkpoint.tensor_type(name) if hasattr(checkpoint, "raw_rows") else None
    if config.tie_word_embeddings or stored not in kquant.TYPES or kquant.TYPES[stored].block != kquant.BLOCK:
        return None
    return stored if config.hidden_size % kquant.BLOCK == 0 else None


def _absorbs_down_proj_order(formats) -> bool:
    """Whether down_proj's act-order permutation moves into gate/up's output columns: its input is
    act(gate(h)) * up(h), elementwise, so x[..., perm] is act(h @ Wg[:, perm]) * (h @ Wu[:, perm]).
    Not through K-quant byte stacks (their columns are not addressable one by one)."""
    down = formats.get("down_proj")
    return (down is not None and down[0].act_order
            and all(formats.get(p) is None or formats[p][0].kind != "kquant" for p in ("gate_proj", "up_proj")))


def _permute_columns(x, perms):
    """x [L, ..., N] with each layer's columns in `perms` [L, N] order."""
    index = jnp.asarray(perms).reshape(perms.shape[0], *([1] * (x.ndim - 2)), perms.shape[1])
    return jnp.take_along_axis(x, index, axis=-1)


def _read_params(config, checkpoint, shapes, formats, dtype, layer_tensors, head_format=None,
                 embed_type=None, down_order_absorbed=False) -> dict:
    params = {"norm": jnp.asarray(checkpoint.tensor("model.norm.weight"), dtype), "layers": {}}
    if embed_type is not None:
        params["embed"] = jnp.asarray(checkpoint.raw_rows("model.embed_tokens.weight"))
    elif head_format is None or not config.tie_word_embeddings:
        params["embed"] = jnp.asarray(checkpoint.tensor("model.embed_tokens.weight"), dtype)
    if head_format is not None and head_format.kind == "kquant":  # the file's own super-blocks
        params["lm_head"] = _read_quantized(checkpoint, head_tensor_name(config), 1, head_format, True, None)
    elif head_format is not None and head_format.group_size:  # the file's own blocks
        arrays = checkpoint.quantized_tensor(head_tensor_name(config))
        params["lm_head"] = {"w": jnp.asarray(arrays["data"]), "scales": jnp.asarray(arrays["scales"])}
    elif head_format is not None:
        qw = quant.quantize(jnp.asarray(checkpoint.tensor(head_tensor_name(config)).T, jnp.float32), head_format)
        params["lm_head"] = {"w": qw.data, "scales": qw.scales}
    elif not config.tie_word_embeddings:
        params["lm_head"] = jnp.asarray(checkpoint.tensor("lm_head.weight"), dtype)
    layer_items = [(path, spec) for path, spec in layer_tensors.items() if _get(shapes["layers"], path) is not None]
    # down_proj first: with its act-order absorbed, its permutation reorders gate/up's columns
    layer_items.sort(key=lambda item: item[0] != ("down_proj", "w"))
    down_perms = None  # [L, intermediate] int32
    for path, (template, transpose) in tqdm(layer_items, desc="Loading weights", unit="tensor", leave=False,
                                             disable=None):  # a bar on a terminal only: in a log, engine.py's line
        if path[-1] == "w" and path[0] in formats:
            arrays = _read_quantized(checkpoint, template, config.num_layers, *formats[path[0]],
                                     shapes["layers"][path[0]])
            if path[0] == "down_proj" and down_order_absorbed:
                down_perms = arrays.pop("input_perm")
            elif path[0] in ("gate_proj", "up_proj") and down_perms is not None:
                arrays = {key: value if key == "input_perm" else _permute_columns(value, down_perms)
                          for key, value in arrays.items()}
            params["layers"].setdefault(path[0], {}).update(arrays)
            continue
        target = _get(shapes["layers"], path)
        host = np.empty(target.shape, dtype=np.float32)
        for layer in range(config.num_layers):
            w = checkpoint.tensor(template.format(layer))
            host[layer] = w.T if transpose else w
        value = jnp.asarray(host, dtype)
        if path[0] in ("gate_proj", "up_proj") and down_perms is not None:  # full precision, or a bias
            value = _permute_columns(value, down_perms)
        _set(params["layers"], path, value)
        del host
    return params


def _read_quantized(checkpoint, template, num_layers, fmt: WeightFormat, native: bool, targets) -> dict:
    """{"w", "scales"(, "mins")} of one stacked projection: the checkpoint's blocks as stored
    (`native`), or each layer's full-precision weight quantized on its own. K-quants: {"w",
    "kquant_index"}, every layer's super-blocks rearranged (`kquant.stack_layers`)."""
    if fmt.kind == "kquant":
        data, index = kquant.stack_layers([
            (kind, kquant.pack_layer(checkpoint.kquant_tensor(template.format(layer)), kind))
            for layer, kind in enumerate(fmt.layer_types)])
        return {"w": jnp.asarray(data), "kquant_index": jnp.asarray(index)}
    parts = {"w": "data", "scales": "scales", "mins": "mins", "input_perm": "input_perm"}
    host = {key: np.empty(targets[key].shape, targets[key].dtype) for key in parts if key in targets}
    absorbed_perms = []  # act-order stored, absorbed by the previous projection (`_read_params`)
    for layer in range(num_layers):
        name = template.format(layer)
        if native and hasattr(checkpoint, "stack_format"):  # GGUF: each layer's type in the stack's format
            arrays = checkpoint.quantized_tensor(name, fmt)
        elif native:
            arrays = checkpoint.quantized_tensor(name)
        else:
            qw = quant.quantize(jnp.asarray(checkpoint.tensor(name).T, jnp.float32), fmt)
            arrays = {"data": qw.data, "scales": qw.scales, "mins": qw.mins}
        for key in host:
            host[key][layer] = np.asarray(arrays[parts[key]])
        if "input_perm" in arrays and "input_perm" not in host:
            absorbed_perms.append(np.asarray(arrays["input_perm"]))
    out = {key: jnp.asarray(value) for key, value in host.items()}
    return out | ({"input_perm": np.stack(absorbed_perms)} if absorbed_perms else {})


def _get(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
