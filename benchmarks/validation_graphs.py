"""Validation generation inside a training run, with and without CUDA graphs (``validation.cuda_graphs``, #29).

A DiT-XL (adaLN-LoRA 256) trains a few steps on mock data; then its Validator samples 4 prompts of 1024 latent
tokens each (identity tokenizer at 64 x 64 pixels, patch 2: the token count of 512 x 512 Cosmos latents), 35-step
Heun, guidance 8, with the EMA weights, twice each way, alternating (graphs first). Per validation: seconds, GPU
memory allocated at its peak and reserved after it; per pair (the same weights both ways), the largest difference
between the two ways' latents relative to their largest value, and the training step times after it. ``--tiny`` runs the tiny model on the CPU
(where nothing is captured) to test the script.

    python benchmarks/validation_graphs.py --out $OUT/validation_graphs.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import torch

PROMPTS = ["Danaus plexippus", "Papilio glaucus", "Morpho menelaus", "Vanessa cardui"]


def recipe(tiny: bool, checkpoint_dir: str) -> dict[str, Any]:
    preset, pixels, text_dim, steps = ("tiny", 8, 64, 3) if tiny else ("XL", 64, 1024, 35)
    return {
        "model": {"name": "dit", "preset": preset, "in_channels": 3, "text_dim": text_dim,
                  "adaln_lora_rank": 16 if tiny else 256},
        "sampler": {"name": "heun", "num_steps": steps}, "tokenizer": {"name": "identity"},
        "text_encoder": {"name": "t5-tiny", "d_model": text_dim, "d_ff": 256}, "task_encoder": {"name": "packed"},
        "data": {"mock": True, "seq_length": 15 * (pixels // 2) ** 2, "mock_latent_shape": [3, 1, pixels, pixels],
                 "mock_text_tokens": 77, "mock_text_dim": text_dim, "mock_samples_per_pack": 15},
        "train": {"train_iters": 1000, "global_batch_size": 1, "log_interval": 1000},
        "optim": {"warmup_iters": 1},
        "checkpoint": {"dir": checkpoint_dir, "save_interval": 0},
        "validation": {"interval": 1000, "prompts": PROMPTS, "height": pixels, "width": pixels, "guidance": 8.0,
                       "loss_batches": 0},
        "logging": {"progress": False},
    }


def run(tiny: bool, train_steps: int) -> dict[str, Any]:
    import dfmkit
    from dfmkit.generation.sampling import SamplingModel
    from dfmkit.train.loop import Trainer

    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(dfmkit.build(recipe(tiny, folder)))
        cuda = trainer.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        validator, latents = trainer.validator, []
        sample = SamplingModel.sample

        def recorded(self, *args, **kwargs):
            latents.append(sample(self, *args, **kwargs))
            return latents[-1]

        SamplingModel.sample = recorded

        def step_ms() -> float:
            sync()
            start = time.perf_counter()
            trainer.train_step()
            sync()
            return (time.perf_counter() - start) * 1000

        results: dict[str, Any] = {"benchmark": "validation_graphs", "device": torch.cuda.get_device_name() if cuda
                                   else "cpu", "torch": torch.__version__, "tiny": tiny,
                                   "train_step_ms_before": [step_ms() for _ in range(train_steps)], "validations": [],
                                   "latents_max_difference": [], "train_step_ms_after": []}
        try:
            for pair in ((True, False), (False, True)):  # both ways with the same weights, then training goes on
                for graphs in pair:
                    validator.config = attrs.evolve(validator.config, cuda_graphs=graphs)
                    sync()
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    start = time.perf_counter()
                    validator.run(trainer.state.step)
                    sync()
                    row = {"cuda_graphs": graphs, "seconds": time.perf_counter() - start}
                    if cuda:
                        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                                   reserved_after_gib=torch.cuda.memory_reserved() / 2**30)
                    results["validations"].append(row)
                    print(row, flush=True)
                results["latents_max_difference"].append(
                    max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(latents[-2], latents[-1])))
                results["train_step_ms_after"].append([step_ms() for _ in range(2)])
        finally:
            SamplingModel.sample = sample
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on 8 x 8 pixels (a CPU smoke run)")
    parser.add_argument("--train-steps", type=int, default=4, help="training steps timed before the validations")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    results = run(args.tiny, args.train_steps)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
