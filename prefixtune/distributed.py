"""Devices, dtypes, and multi-process training on PyTorch's own distributed stack.

``torchrun --nproc_per_node N -m prefixtune train ...`` (or ``prefixtune train --nproc N``, which
runs exactly that) starts N processes. Each one loads the frozen base, takes its share of every
global batch, and trains the prefix under :class:`torch.nn.parallel.DistributedDataParallel`
(gloo on CPU, NCCL on GPU). The base's parameters and buffers are excluded from DDP: they are
neither broadcast nor synchronized; only the prefix's gradients are all-reduced. With
``--fsdp`` the frozen base is also sharded across the processes with FSDP2 ``fully_shard``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import PrefixTuneError

DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: CUDA when present, else CPU. Under torchrun each process takes GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrefixTuneError(f"--device {name}: no CUDA device is available (torch.cuda.is_available() is False)")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(name)
    if name != "cpu":
        raise PrefixTuneError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it; on a CPU, bf16 where this CPU multiplies it clearly faster than
    fp32 (AVX-512 BF16, AMX; measured once per machine, see :mod:`prefixtune.hardware`), else fp32."""
    if name not in DTYPE_NAMES:
        raise PrefixTuneError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        from .hardware import cpu_dtype

        return cpu_dtype()[0]
    return "fp32"


def dtype_note(name: str, device: torch.device) -> str:
    """What ``--dtype name`` means on ``device``, for the user: ``bf16 (--dtype auto: this CPU has ...)``."""
    dtype = resolve_dtype(name, device)
    if name != "auto":
        return dtype
    if device.type == "cpu":
        from .hardware import cpu_dtype

        return f"{dtype} (--dtype auto: {cpu_dtype()[1]})"
    return f"{dtype} (--dtype auto)"


@dataclass
class Dist:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (strided, so shares differ by at most one)."""
        return items[self.rank :: self.world_size]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_env() -> Dist:
    """The rank and world size torchrun set, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); pick this rank's device."""
    d = from_env()
    device = resolve_device(device_name, d.local_rank)
    if d.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return d, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model, device: torch.device):
    """DDP over a PrefixTunedModel that synchronizes only the prefixes (the base is ignored)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [f"base.{n}" for n, _ in model.base.named_parameters()]
    frozen += [f"base.{n}" for n, _ in model.base.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)  # base buffers are ignored too


def shard_base(model) -> None:
    """Shard the frozen base across the processes with FSDP2 ``fully_shard``: each decoder layer, then the rest.

    Every process then holds about 1/N of the base's weights; a layer's weights are all-gathered just
    before it runs and freed after. The prefix stays whole on every process (it is tiny) and is
    synchronized by DDP as usual.
    """
    from torch.distributed.fsdp import fully_shard

    from .compiling import transformer_layers

    if model.geometry.is_encoder_decoder:
        raise PrefixTuneError("--fsdp supports decoder-only models")
    layers = transformer_layers(model)
    if not layers:
        raise PrefixTuneError(f"--fsdp: found no decoder layers to shard in {type(model.base).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model.base)


def local_numel(module) -> int:
    """Parameters this process holds (its shards only, for FSDP-sharded modules)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())


def launch(nproc: int, argv: list[str]) -> int:
    """``prefixtune train --nproc N ...``: run the same command under torchrun with N processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "prefixtune", *argv]
    return subprocess.call(cmd)


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` minus ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
