"""``train.parallel: fsdp``: the model sharded over the processes with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``), as torchtitan and torchtune shard theirs; started by
``torchrun`` or ``accelerate launch`` like DDP, and trained by the same loop.

One FSDP unit per transformer block, one per media tower (the trainable part: a frozen tower's
weights stay whole on every process and out of the optimizer, since nothing reduces or updates
them), the token embedding and the output head (one unit with the root when they are tied: a
shared weight cannot sit in two), the rest (final norm, cross-attention blocks, heads of other
objectives) in the root. bf16 mixed precision is FSDP's policy: bf16 parameters in forward and
backward, gradients reduced and weights kept in fp32.

Checkpoints of a sharded run are ``torch.distributed.checkpoint`` folders, each process writing
its shards (:func:`save_shards`, :func:`load_shards`); the exported model is gathered into one
ordinary checkpoint (:func:`full_state_dict`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from omni.model.lora import add_lora
from omni.model.omni_model import OmniModel

log = logging.getLogger(__name__)


def frozen_tower_params(model) -> set[nn.Parameter]:
    """The media towers' frozen parameters: kept whole on every process (FSDP ignores them)."""
    return {p for p in model.encoders.parameters() if not p.requires_grad}


def shard_model(model, root: nn.Module, mixed_precision: str, device: torch.device) -> None:
    """``fully_shard`` ``model``'s blocks, towers, embedding and head, then ``root`` (the module
    whose forward training calls: the model, or the objective around it), over every process.
    ``mixed_precision``: ``bf16`` (bf16 parameters, fp32 reduction) or ``no``."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    model.to(device)
    # A tower returns its clips' features as views of one batch; the model only reads them (out of
    # place), which is what FSDP's warning about views asks for.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    ignored = frozen_tower_params(model)
    kw = dict(mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
    units = list(model.backbone.layers)
    units += [enc for enc in model.encoders.values() if any(p not in ignored for p in enc.parameters())]
    if not model.config.tie_embeddings:
        units += [model.embed, model.lm_head]
    for unit in units:
        fully_shard(unit, **kw)
        for method in ("encode", "loss"):  # a tower's encode (forward plus its auxiliary loss) and the
            if hasattr(unit, method):       # head's fused loss (LMHead.loss) gather it too
                register_fsdp_forward_method(unit, method)
    fully_shard(root, **kw)
    # Every process uses the same parameters each step (every tower runs, a CTC head at zero weight
    # without transcripts: OmniModel.every_tower), so the reduce-scatters line up. FSDP's
    # set_reduce_scatter_unused_params stays off: it would give parameters no process uses
    # (SigLIP's pooling head) zero gradients, and AdamW weight decay one process does not apply.
    log.info("FSDP2 over %d processes: %d units + root, %d frozen tower tensors kept whole, mixed "
             "precision %s", mesh.size(), len(units), len(ignored), mixed_precision)


def share_of_global_mean(loss: torch.Tensor, mass: torch.Tensor | None, world: int) -> torch.Tensor:
    """``loss``, this process's mean over ``mass`` (its targets' count or weight, or its labelled
    clips), as its share of the mean over every process's: weighted by its part of the summed
    masses, times ``world``, which the gradient average divides out. So an update is the one a single
    process would make on the whole global batch, however the targets fall across processes."""
    if world == 1 or mass is None:
        return loss
    import torch.distributed as dist

    mass = mass.to(loss.device, torch.float32)
    total = mass.clone()
    dist.all_reduce(total)
    return loss * (mass * world / total.clamp(min=1e-12))


@contextlib.contextmanager
def no_gradient_sync(model):
    """Backward passes that accumulate gradients without reducing them (micro-batches before a
    step's last), as DDP's ``no_sync``."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def local_tensors(state: dict) -> dict[str, torch.Tensor]:
    """This process's shards of a (nested) sharded state dict, flat, for the NaN/inf check."""
    from torch.distributed.tensor import DTensor

    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, DTensor):
            out[prefix] = v.to_local()
        elif isinstance(v, torch.Tensor):
            out[prefix] = v
    walk("", state)
    return out


def save_shards(folder: Path, model, optimizer) -> dict[str, torch.Tensor]:
    """Every process writes its shards of the model and optimizer state into ``folder`` (a
    ``torch.distributed.checkpoint`` folder; a collective); returns this process's tensors."""
    import torch.distributed.checkpoint as dcp

    state = _state(model, optimizer)
    dcp.save(state, checkpoint_id=folder)
    return local_tensors(state)


def load_shards(folder: Path, model, optimizer) -> None:
    """The model and optimizer state of a sharded checkpoint, into the sharded ``model`` and
    ``optimizer`` (a collective: each process reads its shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def check_shards(folder: Path) -> None:
    """A sharded checkpoint's folder is whole: its ``.metadata`` reads and every shard file it names
    holds the bytes it says; else a ValueError naming the file (a truncated shard would otherwise
    surface as an error deep inside ``dcp.load``, after the run had committed to this checkpoint)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # noqa: BLE001 - missing, truncated or not a checkpoint: all the same to a reader
        raise ValueError(f"{folder / '.metadata'}: unreadable sharded checkpoint metadata "
                         f"({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = folder / name
        have = f.stat().st_size if f.is_file() else None
        if have is None or have < size:
            problem = "missing" if have is None else f"truncated ({have} of {size} bytes)"
            raise ValueError(f"{f}: {problem}")


def load_full_model(folder: Path, model) -> None:
    """A sharded checkpoint's weights into an unsharded ``model`` in this one process (what
    ``omni export`` reads)."""
    import torch.distributed.checkpoint as dcp

    state = {"model": dict(model.state_dict())}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    model.load_state_dict(state["model"])


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The sharded ``model``'s whole weights, on the CPU of the main process (empty elsewhere); a
    collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def whole_copy(config, lora, state_dict: dict[str, torch.Tensor]):
    """An unsharded ``OmniModel`` of ``config`` (with ``lora``'s adapters, ``train.lora``) holding
    ``state_dict`` (:func:`full_state_dict`): what a sharded run exports, as an unsharded run
    exports its model."""
    with torch.random.fork_rng(devices=[]):  # its initialisation, overwritten, leaves the run's RNG as it was
        model = OmniModel(config)
    if lora is not None:
        add_lora(model, lora)
    model.load_state_dict(state_dict)
    return model.eval()
