"""What every diffusion objective provides, and the training loss machinery they share.

An objective (a component of kind ``objective``, picked by the recipe's ``[diffusion]`` section) describes a
noisy sample at noise level ``sigma`` as

    x = alpha(sigma) x0 + sigma n,        n ~ N(0, I)

(EDM: ``alpha = 1``; rectified flow: ``alpha = 1 - sigma``, its ``t``). Whatever the network predicts, the
objective turns it into the denoiser ``D(x; sigma) ~ E[x0 | x]``, and sampling integrates the probability-flow ODE

    dx/dsigma = alpha'(sigma) D + (x - alpha(sigma) D) / sigma

from the objective's largest noise level down to 0. For ``alpha = 1 - c sigma`` (both built-in objectives) this is
``(x - D) / sigma``, :meth:`Objective.velocity`; an objective with another ``alpha`` overrides that method.

Training: :meth:`Objective.draw` draws, for EVERY sample of a pack, its own noise level, noise and condition-dropout
decision (the reference draws one level per pack); :meth:`Objective.loss_terms` returns each sample's sum of
``weight (prediction - target)^2`` (feature mean per token) and its real-token count; :func:`loss_share` normalises
them per sample ("sample": a 4k-token video and a 256-token image weigh the same) or per token ("token", the
reference's). The draws are separate from the loss, so a training loop can draw on the FULL packed batch, split the
batch and the draw's ``noise`` across context-parallel ranks, and compute each rank's sums:

    draw = objective.draw(batch, generator)                  # sigma [N], noise [L, F], keep_text [N]
    terms = objective.loss_terms(model_fn, batch, draw)      # sums [N] (weighted), counts [N]
    share = loss_share(terms, objective.loss_normalization, env)
    loss = share.total / share.count                         # summed over ranks and micro-batches first

As in NVlabs/edm's training loop, a rank back-propagates the SUM of its samples' losses and the mean is taken over
the whole (global) batch after the gradients are summed across ranks: ``share.count`` is what it divides by.

``model_fn(x_in [L, F], c_noise [N] float32, batch) -> F [L, F]`` is the raw network; the objective decides what it
is fed and what its output means (:func:`as_model_fn` makes one of a model of another dtype).

A new objective subclasses :class:`Objective` and writes the methods marked "each objective", in one file with its
options class and a ``dfmkit_register`` hook (``registries.objective.register(name, factory, options=...)``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import attrs
import torch

from dfmkit.batch import BatchError, PackedBatch
from dfmkit.components.objectives.options import LOSS_NORMALIZATIONS
from dfmkit.parallel import ParallelLayout, all_reduce_context_parallel

ModelFn = Callable[[torch.Tensor, torch.Tensor, PackedBatch], torch.Tensor]


class NetworkFn:
    """``model`` (a backbone, or megatron's DDP around one) as the raw network ``(x, c_noise, batch) -> output``:
    ``x`` and the batch's text are cast to the model's ``dtype`` (the batch moved to ``device`` then), ``c_noise``
    stays float32. Made by :func:`as_model_fn`.

    A batch already in ``dtype`` reaches the model as it is. One in another dtype is converted at every call, into a
    new object each time: where one pack serves many calls (sampling), convert it once beforehand, so the model
    sees the same object every time and derives its layout once (:meth:`dfmkit.batch.PackedBatch.derived`)."""

    def __init__(self, model: Callable[..., torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype

    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        return self.model(x.to(self.dtype), c_noise, self._in_dtype(batch))

    def refresh_text(self, batch: PackedBatch) -> None:
        """Have the backbone compute again what it keeps of ``batch``'s text between forwards, after the text was
        changed in place (a backbone that keeps something defines ``refresh_text(batch)``; the DiT keeps its
        cross-attention keys and values)."""
        network = getattr(self.model, "module", self.model)  # inside megatron's DDP
        refresh = getattr(network, "refresh_text", None)
        if refresh is not None:
            refresh(self._in_dtype(batch))

    def _in_dtype(self, batch: PackedBatch) -> PackedBatch:
        return batch if batch.text.dtype == self.dtype else batch.to(self.device, self.dtype)


def as_model_fn(model: Callable[..., torch.Tensor], device: torch.device, dtype: torch.dtype) -> NetworkFn:
    """``model`` as the raw network (:class:`NetworkFn`)."""
    return NetworkFn(model, device, dtype)


@attrs.frozen
class NoiseDraw:
    """The random part of one training step: one noise level, noise and dropout decision per sample.

    ``noise`` is zero on padding tokens. For a context-parallel shard, keep ``sigma`` and
    ``keep_text`` and replace ``noise`` by its rows of the shard (``attrs.evolve(draw, noise=...)``).
    """

    sigma: torch.Tensor  # [N] float32, in the objective's units
    noise: torch.Tensor  # [L, F] float32, unit Gaussian (not yet scaled by sigma)
    keep_text: torch.Tensor  # [N] bool; False: the sample trains unconditionally (null text)


@attrs.frozen
class LossTerms:
    """Per-sample sums of ``weight (prediction - target)^2`` (feature mean per token) and real-token counts.

    Both are additive over token shards: :func:`loss_share` sums the counts over the context-parallel ranks.
    """

    sq_err_sum: torch.Tensor  # [N] float32, summed over this shard's real tokens
    token_count: torch.Tensor  # [N] float32, real tokens of each sample in this shard


@attrs.frozen
class Prediction:
    """What one objective's loss compares: the network's ``prediction`` [L, F] against its ``target`` [L, F],
    with ``weight`` [N] per sample."""

    prediction: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


class Objective(abc.ABC):
    """The base of every objective: training draws and per-sample loss sums, built on the abstract methods that each
    objective writes (a subclass that lacks one cannot be built). ``options`` is its attrs options object (the
    recipe's ``[diffusion]`` section)."""

    def __init__(self, options):
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options == self.options

    __hash__ = None  # options are mutable attrs objects

    @property
    def condition_dropout(self) -> float:
        return self.options.condition_dropout

    @property
    def loss_normalization(self) -> str:
        return self.options.loss_normalization

    # -- each objective -----------------------------------------------------------------------

    @abc.abstractmethod
    def alpha(self, sigma: torch.Tensor) -> torch.Tensor | float:
        """The signal's scale at noise level ``sigma``: ``x = alpha(sigma) x0 + sigma n``."""
        ...

    @abc.abstractmethod
    def sample_sigma(self, tokens: torch.Tensor, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """A training noise level [N] float32 for each of N samples with ``tokens`` [N] real tokens, drawn with
        ``generator`` on ``device`` (default: the generator's)."""
        ...

    @abc.abstractmethod
    def prediction(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
                   noise: torch.Tensor, batch: PackedBatch, model_dtype: torch.dtype | None) -> Prediction:
        """The network's output for the noisy ``x`` [L, F] (levels ``sigma`` [N]), what it is trained towards, and
        each sample's loss weight."""
        ...

    @abc.abstractmethod
    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: torch.Tensor, batch: PackedBatch,
                model_dtype: torch.dtype | None = None) -> torch.Tensor:
        """D(x; sigma), the prediction of x0, for packed ``x [L, F]`` and one ``sigma [N]`` per sample, in ``x``'s
        dtype. The network sees its input cast to ``model_dtype`` (default: ``x``'s dtype)."""
        ...

    @abc.abstractmethod
    def sampling_sigmas(self, num_steps: int, device=None) -> torch.Tensor:
        """The sampling grid: ``num_steps + 1`` float64 noise levels, falling, the last one 0."""
        ...

    # -- sampling: the grid of a sample's size ------------------------------------------------

    @property
    def grid_by_tokens(self) -> bool:
        """Whether the sampling grid depends on the sample's size: then each size is sampled in packs of its own,
        with the objective :meth:`for_tokens` gives (rectified flow's ``sample_shift_by_tokens``)."""
        return False

    def for_tokens(self, tokens: int) -> Objective:
        """The objective whose :meth:`sampling_sigmas` serve samples of ``tokens`` latent tokens."""
        return self

    # -- sampling: the probability-flow ODE ---------------------------------------------------

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """dx/dsigma of the probability-flow ODE at ``x``, given ``denoised = D(x; sigma)``: ``(x - D) / sigma``,
        exact for ``alpha(sigma) = 1 - c sigma``."""
        return (x - denoised) / sigma

    def renoise(self, x: torch.Tensor, sigma: torch.Tensor, sigma_hat: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """``x`` at level ``sigma`` taken to the higher level ``sigma_hat`` with fresh unit ``noise`` (a stochastic
        sampler's churn): the signal rescaled by ``alpha(sigma_hat) / alpha(sigma)``, and noise added up to
        ``sigma_hat``'s variance."""
        scale = self.alpha(sigma_hat) / self.alpha(sigma)
        return scale * x + (sigma_hat**2 - (scale * sigma) ** 2).sqrt() * noise

    @property
    def max_sigma(self) -> float:
        """The largest noise level the objective defines (a churn never goes above it)."""
        return float("inf")

    # -- training -----------------------------------------------------------------------------

    def draw(self, batch: PackedBatch, generator: torch.Generator | None = None) -> NoiseDraw:
        """Independent noise level, noise and dropout decision for every sample of ``batch``.

        Reproducible from ``generator`` (drawn on its device, moved to the batch's); without
        one, torch's default generator of the batch's device is used.
        """
        device = batch.latents.device
        gen_device = generator.device if generator is not None else device
        n, (length, features) = batch.num_samples, batch.latents.shape
        sigma = self.sample_sigma(batch.seqlens, generator, gen_device)
        keep_text = torch.rand(n, generator=generator, device=gen_device) >= self.condition_dropout
        noise = torch.randn(length, features, generator=generator, device=gen_device)
        noise = noise.to(device) * batch.token_mask().unsqueeze(-1)
        return NoiseDraw(sigma=sigma.to(device), noise=noise, keep_text=keep_text.to(device))

    def loss_terms(self, model_fn: ModelFn, batch: PackedBatch, draw: NoiseDraw,
                   model_dtype: torch.dtype | None = None) -> LossTerms:
        """Per-sample sums of ``weight mean_F (prediction - target)^2`` over real tokens, for the noisy
        ``x = alpha(sigma) x0 + sigma n``.

        ``batch`` may be a context-parallel shard of the batch ``draw`` was made for: ``draw.noise``
        must then hold the shard's rows. Computed in float32 (or the latents' dtype if wider).
        """
        n, (length, features) = batch.num_samples, batch.latents.shape
        if draw.sigma.shape != (n,) or draw.keep_text.shape != (n,) or draw.noise.shape != (length, features):
            raise BatchError(
                f"the noise draw (sigma {tuple(draw.sigma.shape)}, keep_text {tuple(draw.keep_text.shape)}, "
                f"noise {tuple(draw.noise.shape)}) does not fit the batch of {n} samples and {length} x {features} "
                "tokens; for a context-parallel shard pass the shard's noise rows"
            )
        dtype = torch.promote_types(batch.latents.dtype, torch.float32)
        x0 = batch.latents.to(dtype)
        sigma = draw.sigma.to(device=x0.device, dtype=dtype)
        sample_ids = batch.token_sample_ids()
        mask = batch.token_mask()
        noise = draw.noise.to(x0.device, dtype)
        x = self.corrupt(x0, sigma[sample_ids].unsqueeze(-1), noise)
        p = self.prediction(model_fn, x, sigma, x0, noise, drop_condition(batch, draw.keep_text), model_dtype)
        # Padding: zero error and zero gradient, even where the prediction is not finite.
        prediction = torch.where(mask.unsqueeze(-1), p.prediction, p.target)
        per_token = p.weight[sample_ids] * (prediction - p.target).square().mean(-1)
        sums = torch.zeros(n, dtype=dtype, device=x0.device).index_add_(0, sample_ids, per_token)
        counts = torch.zeros(n, dtype=dtype, device=x0.device).index_add_(0, sample_ids, mask.to(dtype))
        return LossTerms(sq_err_sum=sums, token_count=counts)

    def corrupt(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``alpha(sigma) x0 + sigma noise`` (``sigma`` broadcast per token)."""
        return self.alpha(sigma) * x0 + sigma * noise

    def loss(self, model_fn: ModelFn, batch: PackedBatch, generator: torch.Generator | None = None,
             model_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The loss of ``batch`` with a fresh draw, in one call (a single process, no context parallelism)."""
        share = loss_share(self.loss_terms(model_fn, batch, self.draw(batch, generator), model_dtype),
                           self.loss_normalization)
        return share.total / share.count.clamp(min=1)


def sample_levels(sigma: torch.Tensor, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """``sigma`` [N] as ``x``'s dtype and device, checked to hold one level per sample of ``batch``."""
    sigma = sigma.to(device=x.device, dtype=x.dtype)
    if sigma.shape != (batch.num_samples,):
        raise BatchError(f"sigma must have one value per sample, [{batch.num_samples}], got {tuple(sigma.shape)}")
    return sigma


def check_output(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if f.shape != x.shape:
        raise BatchError(f"the model returned shape {tuple(f.shape)} for input {tuple(x.shape)}")
    return f


@attrs.frozen
class LossShare:
    """One rank's part of a batch's loss: the batch's loss is the sum of the ranks' ``total`` over the sum of their
    ``count`` (and so for several micro-batches). ``total`` carries the gradient; ``count`` does not."""

    total: torch.Tensor  # scalar, float32
    count: torch.Tensor  # scalar, float32: samples ("sample") or real tokens ("token") this share counts


def loss_share(terms: LossTerms, normalization: str, env: ParallelLayout | None = None) -> LossShare:
    """This rank's share of the loss of the samples in ``terms``, for normalisation

    - "sample": total = sum_i sq_err_sum_i / token_count_i, count = samples with real tokens;
    - "token":  total = sum_i sq_err_sum_i,                 count = sum_i token_count_i.

    Under context parallelism (``env.cp_size`` > 1) a rank holds part of every sample's tokens: the token counts
    are summed over the context-parallel group first (a sample's mean divides by all of its tokens), each rank
    keeps its own error sums, and only context-parallel rank 0 counts the samples. The loss is linear in the sums,
    so the ranks' totals add up to the batch's, and summing the gradients over the ranks gives its exact gradient.
    """
    if normalization not in LOSS_NORMALIZATIONS:
        choices = ", ".join(LOSS_NORMALIZATIONS)
        raise ValueError(f"loss normalization must be one of {choices}, got {normalization!r}")
    if normalization == "token":
        return LossShare(total=terms.sq_err_sum.sum(), count=terms.token_count.sum().detach())
    counts = terms.token_count.detach().clone()
    if env is not None and env.cp_size > 1:
        all_reduce_context_parallel(counts, env)
    total = (terms.sq_err_sum / counts.clamp(min=1)).sum()
    counts_samples = env is None or env.cp_rank == 0
    count = (counts > 0).sum().float() if counts_samples else torch.zeros((), device=counts.device)
    return LossShare(total=total, count=count)


def drop_condition(batch: PackedBatch, keep_text: torch.Tensor) -> PackedBatch:
    """``batch`` with the text of every sample where ``keep_text`` is False set to zeros (the null condition)."""
    text_sample_ids = torch.repeat_interleave(
        torch.arange(batch.num_samples, device=batch.text.device), batch.seqlens_kv.to(batch.text.device, torch.int64),
        output_size=batch.text.shape[0],  # known: no device sync
    )
    keep = keep_text.to(batch.text.device)[text_sample_ids].unsqueeze(-1)
    return batch.with_text(torch.where(keep, batch.text, 0))
