"""train.fsdp: the student sharded with torch's FSDP2 (`fully_shard`) instead of accelerate's DDP wrapper.

accelerate switches to FSDP only on GPU process groups (on a CPU/gloo group `--use_fsdp` would quietly
run DDP), so the trainer shards the model itself: each decoder layer, then the root, on a 1-D mesh over
the launched processes. The model keeps its class (FSDP2 only adds a mixin), so `.config`,
`save_pretrained` and the step functions see the transformers model they always did; its parameters are
DTensors, each process holding 1/world of every one. The optimiser is made after sharding (it steps the
shards); the checkpoint is gathered into a full state dict (a collective, every process takes part) that
the main process saves with save_pretrained(state_dict=...), so it reloads with transformers alone.
"""

from __future__ import annotations

from typing import Any

import torch


def shard_model(model: Any, device: torch.device, world: int, *, bf16: bool) -> int:
    """Shard `model` in place over `world` processes (the default process group): each decoder layer
    (the classes in transformers' _no_split_modules), then the root. On CUDA in bf16 the shards compute
    in bf16 and reduce gradients in fp32; on CPU autocast alone sets the precision. Returns the number of
    layers sharded on their own."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model.to(device)
    mesh = init_device_mesh(device.type, (world,))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if bf16 and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return len(layers)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class transformers says must not be split (through a
    peft wrapper, whose base model carries the list)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered to CPU on rank 0 (empty elsewhere). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
