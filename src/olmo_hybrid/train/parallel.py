"""Make the plain ``HybridLM`` fast and distributed from the outside (torchtitan's order):
activation checkpointing -> per-block ``torch.compile`` -> FSDP2 on every block, then the root.

The model code knows nothing of this: each step replaces or wraps ``model.model.layers[i]`` in place,
and parameter names stay those of the plain model for every state dict (the checkpoint wrapper strips
its prefix, ``Module.compile`` adds none), so checkpoints move freely between settings.
"""

from __future__ import annotations

import torch
from torch import nn

from olmo_hybrid.config import ConfigError
from olmo_hybrid.distributed import DistEnv


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


def build_mesh(env: DistEnv, dp_replicate: int, dp_shard: int):
    """The data-parallel device mesh: 1-D ``(dp_shard,)``, or 2-D ``(dp_replicate, dp_shard)`` for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    if dp_shard == -1:
        if env.world_size % dp_replicate:
            raise ConfigError(f"parallel.dp_replicate={dp_replicate} does not divide the world size {env.world_size}")
        dp_shard = env.world_size // dp_replicate
    if dp_replicate * dp_shard != env.world_size:
        raise ConfigError(f"parallel.dp_replicate x parallel.dp_shard = {dp_replicate} x {dp_shard} = "
                          f"{dp_replicate * dp_shard}, but torchrun started {env.world_size} processes: "
                          "the product must equal the world size")
    if dp_replicate == 1:
        return init_device_mesh(env.device.type, (dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(env.device.type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))


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
                dp_replicate: int = 1, dp_shard: int = -1, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True, compile_backend: str = "inductor") -> dict:
    """Apply AC, compile and (with more than one process) FSDP2 to ``model`` in place; returns what was
    done, for the log: ``{"ac_layers", "compiled", "mesh"}``."""
    done = {"ac_layers": apply_activation_checkpointing(model, ac, ac_every), "compiled": compile, "mesh": None}
    if compile:
        apply_compile(model, backend=compile_backend)
    if env.distributed:
        mesh = build_mesh(env, dp_replicate, dp_shard)
        apply_fsdp(model, mesh, param_dtype, reshard_after_forward)
        done["mesh"] = mesh
    return done
