"""Device mesh and logical-axis rules -> shardings. The only file that knows mesh axis names.

Parameters and activations are annotated with logical names (models/layers.py); the rules in
`config.sharding_rules` say which mesh axes each name is split over:
  data   : pure data parallelism (parameters replicated);
  fsdp   : batch split too, and parameters + optimizer state sharded (ZeRO-3 style);
  tensor : Megatron-style tensor parallelism (heads and feed-forward hidden split).
"""
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.layers import KV_HEADS
from train.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. `embed` on fsdp shards every weight matrix along d_model when
# fsdp > 1 and is a no-op when fsdp == 1.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    # Grouped-query attention's key/value heads: split like the query heads when their count
    # divides the tensor axis, else replicated (logical_shardings).
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("position", None),
    ("layers", None),  # the stacked-layer axis of scanned blocks (model.scan_layers)
)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [int(mesh_config.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1 (config.mesh)")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % fixed:
            raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide "
                             f"{len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // fixed
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {np.prod(sizes)} "
                         f"devices but {len(devices)} are visible; set one axis to -1")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def rules_from_config(config):
    """The logical-axis rules as a tuple of (name, mesh axes) pairs."""
    rules = config.get("sharding_rules", None) or DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_shardings(abstract_tree, mesh, rules):
    """NamedShardings for a tree whose leaves may be boxed with logical names.

    An axis the mesh would split unevenly (say GPT-2's 50,257-token vocabulary over tensor=2)
    is a ConfigError naming the parameter, rather than an XLA error at the first step. The
    one exception is key/value heads (grouped-query attention): when they do not divide,
    say SmolLM2's 3 over tensor=2, the K and V projections are replicated over that axis
    while the query heads stay split (every device then computes all K and V heads; the
    attention still splits by query head).
    """
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_tree))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat = jax.tree.leaves(shardings)
    for i, ((path, leaf), sh) in enumerate(zip(leaves, flat)):
        try:
            sh.shard_shape(leaf.shape)
            continue
        except ValueError:
            pass
        names = tuple(spec_leaves[i])
        if KV_HEADS in names:
            unsplit = PartitionSpec(*(None if n == KV_HEADS else n for n in names))
            flat[i] = nn.logical_to_mesh_sharding(unsplit, mesh, rules)
        try:
            flat[i].shard_shape(leaf.shape)
        except ValueError:
            raise ConfigError(
                f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
                f"evenly as {sh.spec} over mesh {dict(mesh.shape)}; change config.mesh, or make "
                "the dimension divisible (e.g. config.model.vocab_size=50304 for GPT-2, "
                "nanoGPT's padding)") from None
    return jax.tree.unflatten(jax.tree.structure(shardings), flat)


def batch_sharding(mesh, rules) -> NamedSharding:
    """Sharding of batch arrays of any rank: rows split over the axes the rules give `batch`."""
    spec = nn.logical_to_mesh_axes(("batch",), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch, sharding):
    """Assembles each process's rows into one global jax.Array (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                        local_batch)
