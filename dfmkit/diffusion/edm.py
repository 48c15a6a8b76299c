"""EDM (Karras et al. 2022, arXiv 2206.00364): preconditioning, training noise levels and the loss.

Notation as in the paper (Table 1): data ``x0``, noise level ``sigma``, noisy input
``x = x0 + sigma * n``, raw network ``F_theta`` and denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)     c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)            c_noise = ln(sigma) / 4

Training draws ``ln(sigma) ~ N(P_mean, P_std^2)`` and minimises ``lambda(sigma) |D(x; sigma) - x0|^2``
with ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``.

Packed batches (see :mod:`dfmkit.batch`): EVERY sample of a pack gets its own sigma, its own noise
and its own condition-dropout decision (the reference draws one sigma per pack). The per-token
loss is the feature mean of ``lambda (D - x0)^2`` (as in the reference); each sample's loss is the
mean over its real tokens, and the pack's loss the mean over samples ("sample" normalisation), so
a 4k-token video and a 256-token image weigh the same. "token" normalisation (the reference's)
averages over all real tokens of the pack instead. Padding tokens never contribute.

The random draws are separate from the loss so a training loop can draw on the FULL packed batch,
split the batch (and the draw's ``noise``) across context-parallel ranks, and compute per-sample sums
and counts of :class:`LossTerms` on each rank:

    draw = edm.draw(batch, generator)                       # sigma [N], noise [L, F], keep_text [N]
    terms = edm.loss_terms(model_fn, batch, draw)           # sums [N] (weighted), counts [N]
    share = loss_share(terms, "sample", env)                # this rank's total and count
    loss = share.total / share.count                        # summed over ranks and micro-batches first

As in NVlabs/edm's training loop, a rank back-propagates the SUM of its samples' losses and the mean is taken
over the whole (global) batch after the gradients are summed across ranks: ``share.count`` is what it divides by.

``model_fn(x_in [L, F], c_noise [N] float32, batch) -> F_theta [L, F]`` is the raw network; this
module does the preconditioning (:func:`as_model_fn` makes one of a model of another dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import torch
from attrs import validators as v

from dfmkit.batch import BatchError, PackedBatch
from dfmkit.parallel import ParallelLayout, all_reduce_context_parallel

if TYPE_CHECKING:
    from dfmkit.recipe import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor, PackedBatch], torch.Tensor]
LOSS_NORMALIZATIONS = ("sample", "token")


def as_model_fn(model: Callable[..., torch.Tensor], device: torch.device, dtype: torch.dtype) -> ModelFn:
    """``model`` (a backbone, or megatron's DDP around one) as the raw network: ``x`` and the batch's text are cast to
    the model's ``dtype`` (the batch moved to ``device`` then), ``c_noise`` stays float32."""

    def model_fn(x: torch.Tensor, c_noise: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        batch = batch if batch.text.dtype == dtype else batch.to(device, dtype)
        return model(x.to(dtype), c_noise, batch)

    return model_fn


@attrs.frozen
class NoiseDraw:
    """The random part of one training step: one sigma, noise and dropout decision per sample.

    ``noise`` is zero on padding tokens. For a context-parallel shard, keep ``sigma`` and
    ``keep_text`` and replace ``noise`` by its rows of the shard (``attrs.evolve(draw, noise=...)``).
    """

    sigma: torch.Tensor  # [N] float32
    noise: torch.Tensor  # [L, F] float32, unit Gaussian (not yet scaled by sigma)
    keep_text: torch.Tensor  # [N] bool; False: the sample trains unconditionally (null text)


@attrs.frozen
class LossTerms:
    """Per-sample sums of ``lambda (D - x0)^2`` (feature mean per token) and real-token counts.

    Both are additive over token shards: :func:`loss_share` sums the counts over the context-parallel ranks.
    """

    sq_err_sum: torch.Tensor  # [N] float32, summed over this shard's real tokens
    token_count: torch.Tensor  # [N] float32, real tokens of each sample in this shard


@attrs.frozen
class EDM:
    """EDM preconditioning, training noise levels and loss; ``EDM.from_config(recipe.diffusion)``."""

    sigma_data: float = attrs.field(default=0.5, validator=v.gt(0))
    p_mean: float = -1.2  # EDM paper; the reference uses 0
    p_std: float = attrs.field(default=1.2, validator=v.gt(0))  # EDM paper; the reference uses 1
    condition_dropout: float = attrs.field(default=0.2, validator=[v.ge(0.0), v.le(1.0)])
    loss_normalization: str = attrs.field(default="sample", validator=v.in_(LOSS_NORMALIZATIONS))

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> EDM:
        return cls(
            sigma_data=config.sigma_data,
            p_mean=config.p_mean,
            p_std=config.p_std,
            condition_dropout=config.condition_dropout,
            loss_normalization=config.loss_normalization,
        )

    # -- preconditioning (EDM Table 1) --------------------------------------------------------

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(
        self,
        model_fn: ModelFn,
        x: torch.Tensor,
        sigma: torch.Tensor,
        batch: PackedBatch,
        model_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """D(x; sigma) for packed ``x [L, F]`` and one ``sigma [N]`` per sample, in ``x``'s dtype.

        The network sees ``c_in x`` cast to ``model_dtype`` (default: ``x``'s dtype) and
        ``c_noise [N]`` in float32; its output is cast back before the skip connection.
        """
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        if sigma.shape != (batch.num_samples,):
            raise BatchError(f"sigma must have one value per sample, [{batch.num_samples}], got {tuple(sigma.shape)}")
        s = sigma[batch.token_sample_ids()].unsqueeze(-1)  # [L, 1]
        x_in = self.c_in(s) * x
        f = model_fn(x_in if model_dtype is None else x_in.to(model_dtype), self.c_noise(sigma).float(), batch)
        if f.shape != x.shape:
            raise BatchError(f"the model returned shape {tuple(f.shape)} for input {tuple(x.shape)}")
        return self.c_skip(s) * x + self.c_out(s) * f.to(x.dtype)

    # -- training -----------------------------------------------------------------------------

    def sample_sigma(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """``n`` training noise levels, ln(sigma) ~ N(P_mean, P_std^2), float32."""
        device = generator.device if generator is not None else device
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def draw(self, batch: PackedBatch, generator: torch.Generator | None = None) -> NoiseDraw:
        """Independent sigma, noise and dropout decision for every sample of ``batch``.

        Reproducible from ``generator`` (drawn on its device, moved to the batch's); without
        one, torch's default generator of the batch's device is used.
        """
        device = batch.latents.device
        gen_device = generator.device if generator is not None else device
        n, (length, features) = batch.num_samples, batch.latents.shape
        sigma = self.sample_sigma(n, generator, gen_device)
        keep_text = torch.rand(n, generator=generator, device=gen_device) >= self.condition_dropout
        noise = torch.randn(length, features, generator=generator, device=gen_device)
        noise = noise.to(device) * batch.token_mask().unsqueeze(-1)
        return NoiseDraw(sigma=sigma.to(device), noise=noise, keep_text=keep_text.to(device))

    def loss_terms(
        self,
        model_fn: ModelFn,
        batch: PackedBatch,
        draw: NoiseDraw,
        model_dtype: torch.dtype | None = None,
    ) -> LossTerms:
        """Per-sample sums of ``lambda(sigma) mean_F (D(x0 + sigma n; sigma) - x0)^2`` over real tokens.

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
        x = x0 + sigma[sample_ids].unsqueeze(-1) * draw.noise.to(x0.device, dtype)
        d = self.denoise(model_fn, x, sigma, drop_condition(batch, draw.keep_text), model_dtype)
        d = torch.where(mask.unsqueeze(-1), d, x0)  # padding: zero error and zero gradient, even if d is not finite
        per_token = self.loss_weight(sigma)[sample_ids] * (d - x0).square().mean(-1)
        sums = torch.zeros(n, dtype=dtype, device=x0.device).index_add_(0, sample_ids, per_token)
        counts = torch.zeros(n, dtype=dtype, device=x0.device).index_add_(0, sample_ids, mask.to(dtype))
        return LossTerms(sq_err_sum=sums, token_count=counts)

    def loss(
        self,
        model_fn: ModelFn,
        batch: PackedBatch,
        generator: torch.Generator | None = None,
        model_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The loss of ``batch`` with a fresh draw, in one call (a single process, no context parallelism)."""
        share = loss_share(self.loss_terms(model_fn, batch, self.draw(batch, generator), model_dtype),
                           self.loss_normalization)
        return share.total / share.count.clamp(min=1)


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

