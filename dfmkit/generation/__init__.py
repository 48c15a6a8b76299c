"""Generation from a trained model: ``dfmkit generate``, ``dfmkit export``, and the Python API.

From Python::

    import dfmkit
    from dfmkit.generation import generate, generate_for_job, load

    outputs = load("checkpoints/run").generate(["a red car"], height=256, width=256, out="samples/")
    outputs = generate("exports/run", ["a red car"], steps=35)           # load + generate in one call
    outputs = generate_for_job(dfmkit.build("recipe.toml"), ["a red car"])  # the recipe's checkpoint

The weights come from a checkpoint of ``dfmkit run`` or an export of ``dfmkit export`` (see
:mod:`dfmkit.generation.loading`); the EMA weights are used by default (``weights="model"`` takes the raw
trained weights). Under torchrun, ``context`` > 1 (default: all processes) splits every sample's tokens over
several GPUs (context parallelism), ``tensor`` > 1 runs tensor parallelism.

The modules, one job each: :mod:`~dfmkit.generation.prompts` (requests and text states),
:mod:`~dfmkit.generation.sizes` (sizes that fit the tokenizer and the patches), :mod:`~dfmkit.generation.loading`
and :mod:`~dfmkit.generation.weights` (a model from a checkpoint or export), :mod:`~dfmkit.generation.sampling`
(packed sampling with guidance), :mod:`~dfmkit.generation.graphs` (a sampler's evaluations of a pack as one CUDA
graph), :mod:`~dfmkit.generation.memory` (what a request needs, against what the
device has), :mod:`~dfmkit.generation.outputs` (decoded files and their settings, never of non-finite samples),
:mod:`~dfmkit.generation.generator` (the :class:`Generator`), :mod:`~dfmkit.generation.export_format` and
:mod:`~dfmkit.generation.export` (the export folder: reading and writing). Validation during training
(:mod:`dfmkit.train.validation`) samples and writes with the same code.
"""

from dfmkit.errors import GenerateError
from dfmkit.generation.generator import Generator, Output, generate, generate_for_job, load
from dfmkit.generation.prompts import Request, make_requests, read_prompt_file
from dfmkit.generation.sizes import latent_shape_for

__all__ = ["GenerateError", "Generator", "Output", "Request", "generate", "generate_for_job", "latent_shape_for",
           "load", "make_requests", "read_prompt_file"]
