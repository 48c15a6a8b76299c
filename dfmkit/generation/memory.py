"""Memory: a lower bound of what a generation request needs, checked against what the device has before anything is
encoded or sampled, so that a request that cannot fit (a 65536 x 65536 image) is one clear error rather than a failed
allocation deep in sampling, or a machine that swaps.

The bound counts only what generation surely holds at once, so it refuses no request that could run:

- kept until the call returns (the outputs hold them), in host memory: every output's latent and decoded pixels in
  float32, ``(C T' H' W' + 3 T H W) x 4`` bytes per output;
- for the largest pack, on the device: its latents three times in float32 (the starting noise, the sampler's state
  and the denoised estimate) and one MLP's input and hidden activations, ``tokens x (hidden + MLP hidden / tensor
  parallelism) x`` the model dtype's size, where ``tokens`` are the pack's latent tokens, twice with guidance
  (conditional and unconditional rows), split over the context-parallel ranks. The hidden sizes are those of the
  model's megatron ``config``; a backbone without one counts no activations.

What is available: on the CPU, MemAvailable of /proc/meminfo (``os.sysconf`` elsewhere), or the room left by the
process's memory cgroup where that is less (a container's limit), against the sum of both; on
a GPU, its free memory (``torch.cuda.mem_get_info``, plus what torch's caching allocator holds unused) against the
pack, and host memory against what is kept. The CUDA graphs a Generator keeps for later calls hold GPU memory the
free figure leaves out: a request refused for want of it is checked again after the Generator drops them.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from dfmkit.batch import round_up
from dfmkit.devices import device_available, host_available
from dfmkit.errors import GenerateError
from dfmkit.generation.prompts import Request
from dfmkit.latent_sizes import latent_tokens

FLOAT32_BYTES = 4
LATENT_COPIES = 3  # the starting noise, the sampler's state and the denoised estimate


@attrs.frozen
class MemoryNeed:
    """Bytes a request needs at least: ``kept`` in host memory, ``pack`` on the device for its largest pack of
    ``pack_tokens`` latent tokens; ``largest`` describes the largest output ("output 0: 1 x 65536 x 65536")."""

    kept: int
    pack: int
    pack_tokens: int
    largest: str


def memory_need(requests: Sequence[Request], shapes: Sequence[Sequence[int]], packs: Sequence[Sequence[int]], *,
                patch_spatial: int, patch_temporal: int, pad_multiple: int, guided: bool, model: torch.nn.Module,
                dtype: torch.dtype, tensor: int = 1, context: int = 1) -> MemoryNeed:
    """The lower bound of the module docstring for ``requests`` with latent ``shapes`` (C, T', H', W'), sampled in
    ``packs`` (indices into both)."""
    latent = [c * t * h * w for c, t, h, w in shapes]
    pixels = [3 * r.frames * r.height * r.width for r in requests]
    kept = sum(latent + pixels) * FLOAT32_BYTES
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", 0) or 0
    mlp = (getattr(config, "ffn_hidden_size", 0) or 0) // tensor
    row_bytes = (hidden + mlp) * dtype.itemsize
    pack, pack_tokens = 0, 0
    for indices in packs:
        tokens = sum(round_up(latent_tokens(shapes[i], patch_spatial, patch_temporal), pad_multiple) for i in indices)
        rows = -(-tokens * (2 if guided else 1) // context)
        need = LATENT_COPIES * sum(latent[i] for i in indices) * FLOAT32_BYTES + rows * row_bytes
        if need > pack:
            pack, pack_tokens = need, tokens
    big = max(range(len(requests)), key=lambda i: latent[i] + pixels[i])
    largest = f"output {big}: {requests[big].frames} x {requests[big].height} x {requests[big].width}"
    return MemoryNeed(kept=kept, pack=pack, pack_tokens=pack_tokens, largest=largest)


def _size(count: int) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def check_memory(need: MemoryNeed, device: torch.device, fix: str = "") -> None:
    """A :class:`GenerateError` with the estimate and what is available when ``need`` cannot fit on ``device``.
    ``fix`` says what to change (default: ``dfmkit generate``'s sizes, prompts per call and ``--max-tokens``)."""
    host = host_available()
    smaller = fix or f"ask for smaller sizes (the largest is {need.largest}) or fewer prompts per call"
    split = "" if fix else ", or split the prompts into smaller packs (--max-tokens)"
    if device.type != "cuda":
        total = need.kept + need.pack
        if host is not None and total > host:
            raise GenerateError(
                f"this request needs at least {_size(total)} of memory ({_size(need.kept)} of latents and decoded "
                f"pixels, {_size(need.pack)} to sample its largest pack of {need.pack_tokens} tokens), more than the "
                f"{_size(host)} available; {smaller}")
        return
    free = device_available(device)
    if free is not None and need.pack > free:
        raise GenerateError(
            f"this request needs at least {_size(need.pack)} of GPU memory to sample its largest pack of "
            f"{need.pack_tokens} tokens, more than the {_size(free)} free on {device}; {smaller}{split}")
    if host is not None and need.kept > host:
        raise GenerateError(
            f"this request needs at least {_size(need.kept)} of host memory for its latents and decoded pixels, "
            f"more than the {_size(host)} available; {smaller}")
