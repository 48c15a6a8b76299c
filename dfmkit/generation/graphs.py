"""CUDA graphs of the guided denoiser: each evaluation of a sampler as one graph launch.

Sampling one image with DiT-XL is bound by the host: an evaluation launches thousands of small kernels (48 ms of
host time per evaluation on an H100, issue #29). :func:`graphed_denoiser` records one evaluation of the guided
denoiser (both guidance rows in one forward) as a CUDA graph; every later evaluation copies ``x`` and ``sigma`` into
the graph's input buffers, replays it and clones its output. :class:`PackGraphs` keeps the graphs by pack shape
between sampling calls, so a later call with prompts of the same sizes only replays.

The rules of ``torch.cuda.graphs`` this follows (PyTorch's CUDA semantics notes, "CUDA Graphs"):

- Warm-up: the denoiser runs eagerly ``warmup`` times before the capture, on the stream the capture uses, so what
  happens once happens outside the capture: torch.compile's compilation and autotuning, Triton's JIT, the cuBLAS and
  cuDNN handles and workspaces of that stream, the network's per-pack layout.
- Nothing in an evaluation waits for the device or copies from the host: the samplers keep their time grid on the
  device, the pack is on the device in the network's dtype before the warm-up, and the network derives its layout
  once per pack (tests/test_host_sync.py checks all of this on the CPU).
- The graph reads its inputs and the weights at the addresses they had at capture: ``x`` and ``sigma`` are copied
  into static buffers; weights may change in place (the EMA swap of validation, ``load_state_dict``), but a model
  whose parameters are replaced by new tensors needs new graphs. The pack and its layout are kept alive by the
  :class:`GraphedDenoiser`, which holds the denoiser.
- The output is a static buffer that the next replay overwrites: each call returns a clone (samplers keep earlier
  outputs, such as a multistep solver's previous derivative).

Memory: each graph has a private memory pool that holds every tensor made during the captured evaluation: about the
peak working memory of one eager evaluation (the activations of one forward of the doubled pack), kept reserved
while the graph lives: during a sampling call, and with :class:`PackGraphs` between calls too (at most ``max_packs``
graphs). The capture synchronises the device and returns PyTorch's cached free blocks to CUDA once.

For a model on one GPU: collectives of tensor or context parallelism inside the forward are not captured here
(:meth:`dfmkit.generation.sampling.SamplingModel.sample` samples those eagerly). Not around the DiT's own
``model.cuda_graphs`` either: inductor's CUDA graph trees of each compiled layer would be recorded inside this
capture, which they do not support; :func:`whole_denoiser_graphs` leaves those alone. ``model.compile`` without them
is captured like any other kernels (the fast combination). On any device but CUDA nothing is captured.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch

from dfmkit.diffusion.guidance import GuidedDenoiser

log = logging.getLogger("dfmkit")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

WARMUP_CALLS = 2  # the first may compile and autotune; the second shows the capture will see nothing new

_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream that every warm-up and capture on ``device`` runs on. One for the process: cuBLAS keeps a
    workspace per stream, which the capture must find made by the warm-up, and a new stream per graph would leave
    one behind each time."""
    stream = _capture_streams.get(device)
    if stream is None:
        stream = _capture_streams[device] = torch.cuda.Stream(device)
    return stream


class GraphedDenoiser:
    """A denoiser captured as a CUDA graph: ``self(x, sigma)`` replays it (see :func:`graphed_denoiser`)."""

    def __init__(self, denoise: Denoiser, x_example: torch.Tensor, sigma_example: torch.Tensor, warmup: int):
        self.denoise = denoise  # kept: the graph reads the pack, its layout and the mask the denoiser holds
        self.device = x_example.device
        with torch.no_grad(), torch.cuda.device(self.device):  # sampling: no autograd state in the graph
            self.x = x_example.detach().clone()
            self.sigma = sigma_example.detach().to(self.device).clone()
            stream = capture_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    denoise(self.x, self.sigma)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()  # its own memory pool
            # thread_local: only this thread's calls can break the capture; a training run's loader threads may
            # pin memory meanwhile (which queries events, and would break a "global" capture).
            try:
                with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
                    self.out = denoise(self.x, self.sigma)
            except RuntimeError as exc:  # the network waits for the device or copies from the host in its forward
                exc.add_note("while capturing a sampler evaluation as a CUDA graph; sample without graphs: "
                             "dfmkit generate --no-cuda-graphs, Generator.generate(cuda_graphs=False), "
                             "validation.cuda_graphs = false")
                raise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if x.shape != self.x.shape or x.dtype != self.x.dtype or x.device != self.device:
            raise ValueError(f"this graph was captured for x of shape {tuple(self.x.shape)}, {self.x.dtype} on "
                             f"{self.device}, got {tuple(x.shape)}, {x.dtype} on {x.device}")
        self.x.copy_(x)
        if isinstance(sigma, torch.Tensor):
            self.sigma.copy_(sigma)  # a device-to-device copy for the samplers' 0-d views of their grid
        else:
            self.sigma.fill_(sigma)
        self.graph.replay()
        return self.out.clone()


def graphed_denoiser(denoise: Denoiser, x_example: torch.Tensor, sigma_example: torch.Tensor, *,
                     warmup: int = WARMUP_CALLS) -> Denoiser:
    """``denoise`` as a CUDA graph replay, for ``x`` like ``x_example`` (shape, dtype, device) and ``sigma`` like
    ``sigma_example`` (the samplers pass 0-d float64 views of their time grid, on the device).

    Runs ``denoise(x_example, sigma_example)`` ``warmup`` times (results dropped) and once more under capture; the
    returned :class:`GraphedDenoiser` copies its arguments into the graph's buffers, replays it and returns a clone
    of the output. On any device but CUDA it returns ``denoise`` itself: nothing is captured, and the caller gets the
    eager function it gave.
    """
    if x_example.device.type != "cuda":
        return denoise
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1, got {warmup}")
    return GraphedDenoiser(denoise, x_example, sigma_example, warmup)


class PackGraphs:
    """Graphed guided denoisers by pack, kept between sampling calls, at most ``max_packs`` (the least recently used
    is dropped first, before another is captured).

    A pack of the same key (the caller's: sizes, text lengths, guidance, objective, network) replays the graph
    captured for the first one, conditioned on its own text (:meth:`GuidedDenoiser.condition_on`). One per network:
    the graphs bind its weights where they are (see the module docstring).
    """

    def __init__(self, max_packs: int = 2):
        if max_packs < 1:
            raise ValueError(f"max_packs must be at least 1, got {max_packs}")
        self.max_packs = max_packs
        self._graphs: collections.OrderedDict[Hashable, GraphedDenoiser] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def denoiser(self, key: Hashable, guided: GuidedDenoiser, x_example: torch.Tensor,
                 sigma_example: torch.Tensor) -> Denoiser:
        """The graph of ``key``, conditioned on ``guided``'s text; captured from ``guided`` when there is none."""
        graphed = self._graphs.get(key)
        if graphed is not None:
            self._graphs.move_to_end(key)
            graphed.denoise.condition_on(guided.batch.text)
            return graphed
        while len(self._graphs) >= self.max_packs:
            self._graphs.popitem(last=False)
        graphed = graphed_denoiser(guided, x_example, sigma_example)
        if isinstance(graphed, GraphedDenoiser):
            self._graphs[key] = graphed
        return graphed

    def clear(self) -> None:
        """Drop every graph (their memory goes back to PyTorch's allocator)."""
        self._graphs.clear()


def whole_denoiser_graphs(requested: bool, model_options: Any) -> bool:
    """Whether sampling captures the whole guided denoiser: when ``requested``, unless the backbone replays CUDA
    graphs of its own (``model.cuda_graphs``: inductor's graph trees, which cannot run inside another capture); those
    are used alone then."""
    if requested and getattr(model_options, "cuda_graphs", False):
        log.info("model.cuda_graphs: sampling replays the compiled layers' own CUDA graphs, not one graph per "
                 "evaluation (set model.cuda_graphs = false for those)")
        return False
    return requested
