"""Make the plain ``HybridLM`` fast and distributed from the outside (torchtitan's order):
context parallelism -> activation checkpointing -> per-block ``torch.compile`` -> FSDP2 on every block, then
the root.

The model code knows nothing of this: each step replaces or wraps ``model.model.layers[i]`` or a mixer's
tensor-free op module in place, and parameter names stay those of the plain model for every state dict (the
checkpoint wrapper strips its prefix, ``Module.compile`` adds none), so checkpoints move freely between
settings, context-parallel degrees included.

One device mesh covers the world: ``(dp_replicate, dp_shard, cp)``, context parallelism innermost, so the
``cp_degree`` ranks sharing a batch are neighbours (ranks r * cp ... r * cp + cp - 1; on one node with NVLink).
FSDP2 shards parameters over ``dp_shard x cp`` flattened (torchtitan's ``dp_shard_cp``) and replicates over
``dp_replicate``: ranks of a CP group hold different slices of the same sequences, so their gradients add up
like data-parallel ones, and the sharding covers their memory too.
"""

from __future__ import annotations

import torch
from torch import nn

from olmo_hybrid.config import ConfigError
from olmo_hybrid.distributed import DistEnv
from olmo_hybrid.train.context_parallel import apply_context_parallel
from olmo_hybrid.train.cp_comm import CPGroup


def checkpointed_layers(n_layers: int, mode: str, every: int) -> list[int]:
    """Indices of the blocks to recompute in backward: none, all (``full``), or every ``every``-th
    (``selective``, starting with block 0)."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_layers))
    if mode == "selective":
        return [i for i in range(n_layers) if i % every == 0]
    raise ConfigError(f"trainer.activation_checkpointing: expected none, selective or full, got {mode!r}")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> list[int]:
    """Wrap the chosen blocks so their activations are recomputed in backward; returns their indices.

    Non-reentrant checkpointing (the one that composes with compile and FSDP2); RNG state is not
    preserved because no block draws random numbers (no dropout)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.model.layers
    chosen = checkpointed_layers(len(layers), mode, every)
    for i in chosen:
        layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
    return chosen


def apply_compile(model: nn.Module, fullgraph: bool = True, backend: str = "inductor") -> None:
    """``torch.compile`` every block in place. Blocks of one kind share code, so dynamo compiles one graph
    per kind (and shape) and reuses it; ``fullgraph`` turns any graph break (e.g. around the GDN ops, which
    are custom ops with fake implementations) into an error instead of a silent slowdown. Shapes are
    static (``dynamic=False``): training batches all have one shape, and the validation tail costs one
    more compile rather than symbolic shapes everywhere."""
    from olmo_hybrid import ops
    from olmo_hybrid.ops.dispatch import OPS

    for op in OPS:  # import the kernel backends now: an import inside a compiled block is a graph break
        ops.available_backends(op)
    for block in model.model.layers:
        block.compile(fullgraph=fullgraph, backend=backend, dynamic=False)


def mesh_shape(world_size: int, dp_replicate: int, dp_shard: int, cp_degree: int = 1) -> tuple[int, int, int]:
    """``(dp_replicate, dp_shard, cp_degree)`` with ``dp_shard=-1`` resolved to the rest of the world size; the
    product must equal it (errors name the settings and the numbers)."""
    _check_cp_divides(world_size, cp_degree)
    if dp_shard == -1:
        if world_size % (dp_replicate * cp_degree):
            raise ConfigError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {world_size}"
                              + (f" / parallel.cp_degree={cp_degree}" if cp_degree > 1 else ""))
        dp_shard = world_size // (dp_replicate * cp_degree)
    if dp_replicate * dp_shard * cp_degree != world_size:
        names, sizes = ["parallel.dp_replicate", "parallel.dp_shard"], [dp_replicate, dp_shard]
        if cp_degree > 1:
            names, sizes = [*names, "parallel.cp_degree"], [*sizes, cp_degree]
        raise ConfigError(f"{' x '.join(names)} = {' x '.join(map(str, sizes))} = {dp_replicate * dp_shard * cp_degree}"
                          f", but torchrun started {world_size} processes: the product must equal the world size")
    return dp_replicate, dp_shard, cp_degree


def _check_cp_divides(world_size: int, cp_degree: int) -> None:
    if world_size % cp_degree:
        raise ConfigError(f"parallel.cp_degree={cp_degree} does not divide the world size {world_size} (the "
                          "processes torchrun started): each group of cp_degree ranks shares one batch")


def data_parallel_layout(env: DistEnv, cp_degree: int) -> tuple[int, int, int]:
    """``(dp_rank, dp_size, cp_rank)`` of this process in the mesh (CP innermost): the loader hands data-parallel
    rank ``dp_rank`` of ``dp_size`` its batch, and CP rank ``cp_rank`` takes its slice of every row."""
    _check_cp_divides(env.world_size, cp_degree)
    dp_rank, cp_rank = divmod(env.rank, cp_degree)
    return dp_rank, env.world_size // cp_degree, cp_rank


def build_mesh(env: DistEnv, dp_replicate: int, dp_shard: int, cp_degree: int = 1):
    """``(fsdp_mesh, cp)``: the mesh FSDP2 shards over, 1-D ``(dp_shard,)`` or 2-D ``(dp_replicate, dp_shard)``
    (HSDP), with ``dp_shard`` becoming ``dp_shard_cp`` under context parallelism; and the :class:`CPGroup` of this
    rank (None without context parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh

    dp_replicate, dp_shard, cp_degree = mesh_shape(env.world_size, dp_replicate, dp_shard, cp_degree)
    shard = "dp_shard" if cp_degree == 1 else "dp_shard_cp"
    shape, names = (dp_shard * cp_degree,), (shard,)
    if dp_replicate > 1:
        shape, names = (dp_replicate, *shape), ("dp_replicate", *names)
    fsdp = init_device_mesh(env.device.type, shape, mesh_dim_names=names)
    if cp_degree == 1:
        return fsdp, None
    cp_mesh = fsdp._unflatten(shard, (dp_shard, cp_degree), ("dp_shard", "cp"))["cp"]
    return fsdp, CPGroup(cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_degree)


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype | None, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm and LM head stay in the root's group,
    which also keeps tied embeddings together). ``param_dtype`` bf16 gives bf16 compute with fp32 gradient
    reduction; None keeps fp32. The last block is not resharded after forward: backward needs it at once."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = model.model.layers
    for i, block in enumerate(layers):
        fully_shard(block, mesh=mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)


def parallelize(model: nn.Module, env: DistEnv, *, ac: str = "none", ac_every: int = 2, compile: bool = False,
                dp_replicate: int = 1, dp_shard: int = -1, cp_degree: int = 1, cp_mode: str = "ulysses",
                param_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                compile_backend: str = "inductor") -> dict:
    """Apply context parallelism, AC, compile and (with more than one process) FSDP2 to ``model`` in place;
    returns what was done, for the log: ``{"ac_layers", "compiled", "mesh", "cp"}``."""
    mesh = cp = None
    if env.distributed:
        mesh, cp = build_mesh(env, dp_replicate, dp_shard, cp_degree)
    elif cp_degree > 1:
        mesh_shape(env.world_size, dp_replicate, dp_shard, cp_degree)  # raises: one process cannot share a sequence
    if cp is not None:
        apply_context_parallel(model, cp, cp_mode)
    done = {"ac_layers": apply_activation_checkpointing(model, ac, ac_every), "compiled": compile, "mesh": mesh,
            "cp": cp}
    if compile:
        apply_compile(model, backend=compile_backend)
    if mesh is not None:
        apply_fsdp(model, mesh, param_dtype, reshard_after_forward)
    return done
