"""Training on several processes through PyTorch's own stack: torchrun starts them, DDP or FSDP2 wraps the model.

Owns: reading torchrun's environment (`Ranks`), the process group (gloo on CPU, nccl on CUDA), which share of each
global micro-batch a rank trains on, wrapping the step's loss in a module that DDP / FSDP2 can drive, global sums,
and gathering what rank 0 writes (trainable weights, optimizer state) into the single-process format — so a
checkpoint from N ranks resumes on M. Launching torchrun for `lmforge train --nproc N` is here too.
Must not: change what one process does (world size 1 is the plain path, untouched), or write files itself.

Why a loss module: the losses run the decoder and the LM head themselves (train/losses.py), not the model's
forward. DDP synchronises gradients only for work done inside its own forward, and FSDP2 gathers a module's weights
in that module's forward, so the whole loss computation is the forward of the wrapped module.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..rundir import trainable_state

MODES = ("ddp", "fsdp", "fsdp_grad_op")


def peer_lost(error: BaseException) -> bool:
    """Whether a collective failed because another process died: torch's DistError (nccl, timeouts), or gloo's
    plain RuntimeError naming its closed or reset connection."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and "gloo" in text and ("by peer" in text or "Timed out" in text)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (world 1 = a plain single-process run)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's examples of one global micro-batch: consecutive slices, the first ranks one longer when the
        micro-batch does not divide evenly. A rank left with nothing trains on a copy of the first example with
        weight 0 (returned flag True), so every rank runs the same number of forwards and the collectives stay in
        step; the result is the same as one process training on the whole micro-batch."""
        base, extra = divmod(len(indices), self.world)
        start = self.rank * base + min(self.rank, extra)
        mine = indices[start:start + base + (self.rank < extra)]
        return (mine, False) if mine else (indices[:1], True)


def ranks_from_environment() -> Ranks:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK); absent → one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def training_device(ranks: Ranks) -> torch.device:
    """CUDA when this machine has it (one GPU per local rank), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def start(ranks: Ranks, device: torch.device, timeout_s: float = 1800.0) -> bool:
    """Join the process group: nccl between GPUs, gloo on the CPU. Nothing to do for one process (or when the
    caller already joined one). True when this call started it (the caller stops it)."""
    if not ranks.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def choose_mode(requested: str, ranks: Ranks) -> str | None:
    """None for one process; otherwise ddp or fsdp as configured (auto = ddp: every rank holds the whole model,
    which is fastest whenever it fits)."""
    if not ranks.distributed:
        return None
    if requested not in ("auto", *MODES):
        raise ConfigError(f"train.distributed: {requested!r} is not one of auto, {', '.join(MODES)}")
    return "ddp" if requested == "auto" else requested


class StepLoss(torch.nn.Module):
    """The stage's loss as a module: forward(batch) = loss_fn(model, batch). DDP / FSDP2 wrap this."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        output = self.loss_fn(self.model, batch)
        return output.loss_sum, output.metrics


class Parallel:
    """The wrapped step loss and what the loop needs from it: the loss of a batch, accumulation without a sync,
    global sums and rank 0's full copy of the trainable state."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, mode: str, ranks: Ranks,
                 find_unused_parameters: bool = False):
        self.model, self.mode, self.ranks = model, mode, ranks
        self.module = StepLoss(model, loss_fn)
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.wrapped = DistributedDataParallel(
                self.module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=find_unused_parameters)
        elif mode in ("fsdp", "fsdp_grad_op"):
            from torch.distributed.fsdp import fully_shard

            keep_whole = mode == "fsdp_grad_op"  # ZeRO-2: weights stay gathered from forward to backward
            for layer in _decoder_layers(model):  # one group per decoder layer; embeddings, norm and head in the root
                fully_shard(layer, reshard_after_forward=not keep_whole)
            self.wrapped = fully_shard(self.module, reshard_after_forward=not keep_whole)
        else:
            raise ValueError(mode)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        return self.wrapped(batch)

    def no_sync(self, last: bool):
        """Gradients of all but the step's last micro-batch stay local (they are summed on the last one)."""
        if last:
            return nullcontext()
        if self.mode == "ddp":
            return self.wrapped.no_sync()
        return _fsdp_no_sync(self.wrapped)

    def sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(self.model))
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request reaches the processes at different times)."""
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name, whole, on the CPU (every rank must call; rank 0 writes them)."""
        if self.mode == "ddp":
            return trainable_state(self.model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        return {name.removeprefix("model."): tensor for name, tensor in full.items()
                if name.removeprefix("model.") in trainable}

    def optimizer_state(self, optimizer) -> dict:
        """The optimizer's state in the single-process layout (ids in the order of the trainable parameters)."""
        if self.mode == "ddp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        by_name = get_optimizer_state_dict(self.module, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        order = [name for name, p in self.module.named_parameters() if p.requires_grad]
        index = {name: i for i, name in enumerate(order)}
        return {"state": {index[name]: value for name, value in by_name["state"].items()},
                "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                                 for group in by_name["param_groups"]]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        if self.mode == "ddp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        order = [name for name, p in self.module.named_parameters() if p.requires_grad]
        by_name = {"state": {order[i]: value for i, value in state["state"].items()},
                   "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                    for group in state["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.mode == "ddp":
            self.model.load_state_dict(tensors, strict=False)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.module, {f"model.{name}": t for name, t in tensors.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    @contextmanager
    def whole_model(self, rebuild: Callable[[], torch.nn.Module]) -> Iterator[torch.nn.Module | None]:
        """The trained model, whole, on rank 0 (None on the others), e.g. to save it. DDP: the model itself. FSDP:
        every process sends its shards; rank 0 loads them into a plain copy built by `rebuild` (the same model and
        method, unsharded), since sharded parameters are not tensors a saver can write."""
        if self.mode == "ddp":
            yield self.model
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.ranks.is_main:
            yield None
            return
        copy = rebuild()
        copy.load_state_dict({name.removeprefix("model."): tensor for name, tensor in full.items()})
        yield copy


def _decoder_layers(model) -> list[torch.nn.Module]:
    from ..model.methods import unwrap

    decoder = unwrap(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"train.distributed fsdp: {type(decoder).__name__} has no .layers to shard; use ddp")
    return list(layers)


@contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def _collective_device(model) -> torch.device:
    device = next(model.parameters()).device
    return device if device.type == "cuda" else torch.device("cpu")


def broadcast_object(value, ranks: Ranks):
    """Rank 0's value on every rank (e.g. a decision only rank 0 can make)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def gather_objects(value, ranks: Ranks) -> list:
    """Every rank's value, on rank 0 (others get an empty list)."""
    if not ranks.distributed:
        return [value]
    out = [None] * ranks.world if ranks.is_main else None
    dist.gather_object(value, out, dst=0)
    return out or []


def processes_here() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE): they share its memory."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def to_device(batch, device: torch.device):
    """A copy of a batch (a dataclass of tensors, possibly nested) with its tensors on `device` (the GPU path)."""
    import dataclasses

    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, **{f.name: to_device(getattr(batch, f.name), device)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(item, device) for item in batch)
    return batch


def launch(nproc: int, argv: list[str], threads_per_rank: int | None = None) -> int:
    """`lmforge train CONFIG --nproc N`: the same command under torchrun (`-m lmforge`), one process per rank on this
    machine. Returns torchrun's exit code: non-zero when any rank failed (torchrun then stops the others)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give 1 or more processes")
    env = dict(os.environ, LMFORGE_CONFIG_NOTES_SAID="1")  # the launcher printed the config's notes already
    if threads_per_rank:
        env["OMP_NUM_THREADS"] = str(threads_per_rank)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "-m", "lmforge", *argv]
    return subprocess.call(command, env=env)
