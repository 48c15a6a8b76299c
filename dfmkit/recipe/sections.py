"""The attrs schema of a recipe: its fixed sections, its component sections and :class:`Recipe`.

A recipe has fixed sections (``[data]``, ``[train]``, ``[optim]``, ``[parallel]``, ``[checkpoint]``,
``[logging]``, ``[validation]``) and component sections (``[model]``, ``[diffusion]`` (the objective),
``[sampler]``, ``[tokenizer]``, ``[text_encoder]``, ``[task_encoder]``) that name a registered
component with ``name = "..."``; the rest of a component section is validated by that
component's own options class (:mod:`dfmkit.recipe.loading`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import attrs
from attrs import validators as v


class InfAllowed:
    """Marks a float field whose documented meaning includes +-inf; NaN is refused there too."""


#: The type of a float option that may be infinite (``s_max = inf``: no upper bound); plain ``float``
#: fields refuse inf and NaN.
FloatOrInf = Annotated[float, InfAllowed()]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------
# Component sections
# --------------------------------------------------------------------------------------------


@attrs.define(kw_only=True)
class ComponentSection:
    """A section that picks a component by ``name``; ``options`` is that component's attrs object."""

    kind: ClassVar[str] = ""
    default: ClassVar[str] = ""
    name: str
    options: Any


class BackboneSection(ComponentSection):
    kind = "backbone"
    default = "dit"


class DiffusionSection(ComponentSection):
    kind = "objective"
    default = "edm"


class SamplerSection(ComponentSection):
    kind = "sampler"
    default = "heun"


class TokenizerSection(ComponentSection):
    kind = "tokenizer"
    default = "identity"


class TextEncoderSection(ComponentSection):
    kind = "text_encoder"
    default = "t5"


class TaskEncoderSection(ComponentSection):
    kind = "task_encoder"
    default = "packed"


# --------------------------------------------------------------------------------------------
# Fixed sections
# --------------------------------------------------------------------------------------------

_positive = v.gt(0)
_non_negative = v.ge(0)
_fraction = [v.ge(0.0), v.le(1.0)]


def _seed(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    # torch.Generator.manual_seed takes up to 2**64 - 1; seeds here are offset (seed + index, megatron's
    # seed + 2718 + rank), so the upper half stays free.
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"'{attribute.name}' must be an integer from 0 to 2**63 - 1, got {value}")


def _betas(instance: Any, attribute: attrs.Attribute, value: tuple[float, float]) -> None:
    if not all(0.0 <= beta < 1.0 for beta in value):
        raise ValueError(f"'{attribute.name}' each beta must be in [0, 1), got {tuple(value)}")


def _sigmas(instance: Any, attribute: attrs.Attribute, value: list[float]) -> None:
    if not all(sigma > 0 for sigma in value):
        raise ValueError(f"'{attribute.name}' must be noise levels > 0, got {value}")


@attrs.define(kw_only=True)
class DataConfig:
    """Where samples come from and how they are packed into sequences."""

    path: str = ""  # a folder written by `dfmkit prepare` (Energon-indexed WebDataset)
    # If `path` does not exist yet, `dfmkit run` first prepares it from this source (as `dfmkit prepare --source`).
    prepare_source: str = ""
    mock: bool = False  # random latents and text of the shapes below, for benchmarks
    seq_length: int = attrs.field(default=4096, validator=_positive)  # latent tokens per packed sequence (at most)
    packing_buffer_size: int = attrs.field(default=64, validator=_positive)  # samples considered per packing round
    shuffle_buffer_size: int = attrs.field(default=100, validator=_non_negative)
    max_samples_per_sequence: int = attrs.field(default=100, validator=_positive)  # Energon: samples read in a row from one shard
    num_workers: int = attrs.field(default=2, validator=_non_negative)  # loader worker processes per data-parallel rank
    # `dfmkit prepare`: resizing (short side to image_size, 0 keeps it; sides rounded to size_multiple),
    # frames (max_frames, 0 = all), the fps recorded when a source has none, and the train/val/test split.
    image_size: int = attrs.field(default=512, validator=_non_negative)
    size_multiple: int = attrs.field(default=16, validator=_positive)
    resize_mode: str = attrs.field(default="bilinear", validator=v.in_(["bilinear", "bicubic", "nearest"]))
    max_frames: int = attrs.field(default=0, validator=_non_negative)
    fps: float = attrs.field(default=30.0, validator=_positive)
    split: list[float] = attrs.field(factory=lambda: [1.0, 0.0, 0.0])
    # data.mock = true: random samples of these sizes ([C, T, H, W] latent; text tokens x width) packed
    # mock_samples_per_pack to a sequence (0: as many as data.seq_length holds). C = 0 and text width 0
    # take the model's in_channels and text_dim.
    mock_latent_shape: list[int] = attrs.field(factory=lambda: [0, 1, 64, 64])
    mock_text_tokens: int = attrs.field(default=16, validator=_positive)
    mock_text_dim: int = attrs.field(default=0, validator=_non_negative)
    mock_samples_per_pack: int = attrs.field(default=0, validator=_non_negative)

    @split.validator
    def _check_split(self, attribute: attrs.Attribute, value: list[float]) -> None:
        if len(value) != 3 or any(x < 0 for x in value) or sum(value) <= 0:
            raise ValueError(f"'split' must be three non-negative ratios train, val, test such as [0.9, 0.05, 0.05] (got {value})")

    @mock_latent_shape.validator
    def _check_mock_shape(self, attribute: attrs.Attribute, value: list[int]) -> None:
        if len(value) != 4 or value[0] < 0 or any(x < 1 for x in value[1:]):
            raise ValueError(f"'mock_latent_shape' must be four sizes [C, T, H, W], C = 0 for the model's (got {value})")


@attrs.define(kw_only=True)
class TrainConfig:
    """The training loop."""

    train_iters: int = attrs.field(default=20000, validator=_positive)  # more than optim.warmup_iters
    global_batch_size: int = attrs.field(default=8, validator=_positive)  # packed sequences per step
    seed: int = attrs.field(default=1234, validator=_seed)
    device: str = attrs.field(default="auto", validator=v.in_(["auto", "cpu", "cuda"]))
    precision: str = attrs.field(default="auto", validator=v.in_(["auto", "bf16", "fp32"]))
    log_interval: int = attrs.field(default=10, validator=_positive)
    ema_decay: float = attrs.field(default=0.9999, validator=_fraction)
    ema_halflife: float = attrs.field(default=0.0, validator=_non_negative)  # in steps; > 0 overrides ema_decay
    # steps in a row skipped for a non-finite loss or gradient norm before training stops (and saves)
    max_nonfinite_steps: int = attrs.field(default=5, validator=_positive)


@attrs.define(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (defaults as in the reference)."""

    lr: float = attrs.field(default=9e-5, validator=_positive)
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.95), validator=_betas)
    eps: float = attrs.field(default=1e-5, validator=_positive)
    weight_decay: float = attrs.field(default=0.033, validator=_non_negative)
    clip_grad: float = attrs.field(default=1.0, validator=_non_negative)  # 0 disables clipping
    warmup_iters: int = attrs.field(default=2000, validator=_non_negative)
    decay_style: str = attrs.field(default="cosine", validator=v.in_(["cosine", "linear", "constant"]))
    min_lr_ratio: float = attrs.field(default=0.1, validator=_fraction)


@attrs.define(kw_only=True)
class ParallelConfig:
    """Model parallelism; data parallelism takes the remaining processes (world / (tensor * context)).

    tensor: ranks that split every layer's heads and MLP (megatron column/row-parallel linears).
    sequence: also split the tokens between tensor-parallel regions (needs tensor > 1).
    context: ranks that split every packed sample's tokens (attention gathers keys/values).
    Each sample is padded to a multiple of :attr:`pad_multiple` tokens.
    """

    tensor: int = attrs.field(default=1, validator=_positive)
    sequence: bool = False  # sequence parallelism inside tensor-parallel regions (needs tensor > 1)
    context: int = attrs.field(default=1, validator=_positive)
    distributed_optimizer: str = attrs.field(default="auto", validator=v.in_(["auto", "on", "off"]))

    def __attrs_post_init__(self) -> None:
        if self.sequence and self.tensor == 1:
            raise ValueError("sequence = true needs tensor > 1 (sequence parallelism splits tensor-parallel regions)")

    @property
    def pad_multiple(self) -> int:
        """What every sample's token count is padded to a multiple of: ``2 * context`` when context
        parallelism is on (the load-balanced split), times ``tensor`` when sequence parallelism is on (each
        context shard is split again across the tensor-parallel ranks); 1 otherwise."""
        multiple = 2 * self.context if self.context > 1 else 1
        return multiple * self.tensor if self.sequence and self.tensor > 1 else multiple


@attrs.define(kw_only=True)
class CheckpointConfig:
    """Where and how often to save; resume picks up the newest complete checkpoint."""

    dir: str = "checkpoints"
    save_interval: int = attrs.field(default=1000, validator=_non_negative)  # 0: only at the end
    keep_last: int = attrs.field(default=3, validator=_positive)
    resume: bool = True
    load: str = ""  # start from this checkpoint instead of the newest one in `dir`
    # A resume on data whose index differs from the one the checkpoint read: "refuse" (an error naming the change),
    # or "restart" (everything else resumes; the data is read from its start).
    on_data_change: str = attrs.field(default="refuse", validator=v.in_(["refuse", "restart"]))


@attrs.define(kw_only=True)
class LoggingConfig:
    """TensorBoard always, Weights & Biases when a project is named."""

    dir: str = ""  # default: <checkpoint.dir>/tensorboard
    wandb_project: str = ""
    wandb_entity: str = ""
    progress: bool = True  # a progress bar on a terminal; elsewhere, and when off: a line per train.log_interval


@attrs.define(kw_only=True)
class ValidationConfig:
    """Periodic validation: loss at fixed noise levels and generation of the prompts."""

    interval: int = attrs.field(default=1000, validator=_non_negative)  # 0: never
    prompts: list[str] = attrs.Factory(list)
    height: int = attrs.field(default=256, validator=_positive)
    width: int = attrs.field(default=256, validator=_positive)
    frames: int = attrs.field(default=1, validator=_positive)
    guidance: float = 7.0  # classifier-free guidance w (1: none); steps and sampler come from [sampler]
    seed: int = attrs.field(default=0, validator=_seed)
    loss_sigmas: list[float] = attrs.field(factory=list, validator=_sigmas)  # []: the objective's LOSS_SIGMAS
    loss_batches: int = attrs.field(default=2, validator=_non_negative)
    # Generation on a GPU: each pack's sampler evaluations replay one CUDA graph (dfmkit.generation.graphs), captured
    # at each validation and freed after it, as `dfmkit generate` does. Far less host time per evaluation (few
    # prompts are bound by kernel launches); costs one capture per validation and, while it runs, about one
    # forward's activations of GPU memory, no more than sampling without graphs peaks at. Layouts without tensor or
    # context parallelism only (others sample eagerly); not with model.cuda_graphs, whose graphs are used instead.
    cuda_graphs: bool = True


@attrs.define(kw_only=True)
class Recipe:
    """A whole recipe. Build one with :func:`load_recipe`, which validates every section."""

    model: BackboneSection
    diffusion: DiffusionSection
    sampler: SamplerSection
    tokenizer: TokenizerSection
    text_encoder: TextEncoderSection
    task_encoder: TaskEncoderSection
    data: DataConfig = attrs.Factory(DataConfig)
    train: TrainConfig = attrs.Factory(TrainConfig)
    optim: OptimConfig = attrs.Factory(OptimConfig)
    parallel: ParallelConfig = attrs.Factory(ParallelConfig)
    checkpoint: CheckpointConfig = attrs.Factory(CheckpointConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    validation: ValidationConfig = attrs.Factory(ValidationConfig)


attrs.resolve_types(Recipe)  # `from __future__ import annotations` leaves field.type as a string until resolved

COMPONENT_SECTIONS: dict[str, type[ComponentSection]] = {
    field.name: field.type
    for field in attrs.fields(Recipe)
    if isinstance(field.type, type) and issubclass(field.type, ComponentSection)
}

