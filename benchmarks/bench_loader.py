"""Loader throughput and packing efficiency (a measurement, not a test).

    python benchmarks/bench_loader.py                 # everything, a few minutes on 2 cores
    python benchmarks/bench_loader.py --samples 1000  # quicker

1. Throughput on butterfly-shaped samples: latents 16x1x64x64 (bf16, as the Cosmos CV4x8x8
   tokenizer gives for 512x512 images -> 1024 tokens at patch 2) and ~10 text tokens of width
   1024 (fp32), written to shards as ``dfmkit prepare`` writes them, read back through the
   Energon loader with the ``packed`` task encoder (decode, check, patchify, pad, pack) at
   data.seq_length = 8192 (8 samples a pack). Reported: samples/s and packed batches/s for
   0, 1 and 2 worker processes.
2. Packing efficiency on a mixed set (images of several aspect ratios and sizes, some videos):
   real tokens / tokens in the packed sequences (what the model computes; the loss is the
   per-sample padding to the pad multiple), and real tokens / (packs x seq_length) (how full
   the packs are against data.seq_length), for a few pad multiples and packing buffer sizes.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from dfmkit.data.loader import build_train_loader
from dfmkit.data.prepare import index_dataset
from dfmkit.data.shards import DATASET_INFO, ShardWriter
from dfmkit.recipe import load_recipe
from dfmkit.registry import Registries


def write_dataset(root: Path, shapes: list[tuple[int, int, int, int]], text_dim: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    with ShardWriter(root, "train-r000", max_samples=500) as writer:
        for i, shape in enumerate(shapes):
            latent = torch.randn(shape, generator=generator).to(torch.bfloat16)
            text = torch.randn(rng.randint(6, 14), text_dim, generator=generator)
            writer.write(f"{i:09d}", latent, text, {"caption": f"sample {i}"})
    (root / DATASET_INFO).write_text(f'{{"latent_channels": {shapes[0][0]}, "text_dim": {text_dim}}}')
    index_dataset(root)


def recipe_for(path: Path, seq_length: int, buffer: int, workers: int):
    registries = _registries()
    return load_recipe({
        "model": {"name": "bench"}, "sampler": {"name": "bench"}, "tokenizer": {"name": "bench"},
        "text_encoder": {"name": "bench"}, "task_encoder": {"name": "bench"},
        "data": {"path": str(path), "seq_length": seq_length, "packing_buffer_size": buffer,
                 "num_workers": workers, "shuffle_buffer_size": 100},
    }, registries=registries)


def _registries() -> Registries:
    import attrs

    @attrs.define
    class Patch:
        patch_spatial: int = 2
        patch_temporal: int = 1

    registries = Registries()
    for kind in ("sampler", "tokenizer", "text_encoder", "task_encoder"):
        registries[kind].register("bench", dict)
    registries.backbone.register("bench", dict, options=Patch)
    return registries


def _cpu_seconds() -> float:
    """CPU time of this process and its children (the loader's workers) so far."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def throughput(path: Path, workers: int, seconds: float, seq_length: int = 8192) -> tuple[float, float, float, int]:
    """(samples/s, packed batches/s, samples per CPU-second, skipped) over ``seconds`` of steady reading."""
    loader = build_train_loader(recipe_for(path, seq_length, 64, workers), 0, 1, pad_multiple=1)
    for _ in range(3):  # start the workers, fill the shuffle and packing buffers
        next(loader)
    samples = batches = 0
    cpu = _cpu_seconds()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(loader)
        samples += batch.num_samples
        batches += 1
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
    loader.close()
    return samples / elapsed, batches / elapsed, samples / cpu, loader.skips.total


def mixed_shapes(n: int, seed: int = 1) -> list[tuple[int, int, int, int]]:
    """Latent shapes of images (short side 512 -> 64 latent, common aspect ratios, some smaller) and videos."""
    rng = random.Random(seed)
    shapes = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.75:  # images, short side 256..512 px -> 32..64 latent, aspect 1:1 .. 16:9
            short = rng.choice([32, 40, 48, 56, 64])
            long = int(short * rng.choice([1.0, 1.25, 1.333, 1.5, 1.777])) // 2 * 2
            h, w = (short, long) if rng.random() < 0.7 else (long, short)
            shapes.append((16, 1, h, w))
        else:  # short videos: 1 + 4k latent frames at 240p..360p
            shapes.append((16, rng.choice([2, 3, 4, 5]), rng.choice([30, 40, 46]), rng.choice([52, 60, 80])))
    return shapes


def packing(path: Path, seq_length: int, buffer: int, pad_multiple: int, n_samples: int) -> tuple[float, float, float]:
    loader = build_train_loader(recipe_for(path, seq_length, buffer, 0), 0, 1, pad_multiple=pad_multiple, repeat=False)
    real = packed = packs = samples = 0
    for batch in loader:
        real += int(batch.seqlens.sum())
        packed += batch.num_tokens
        packs += 1
        samples += batch.num_samples
    assert samples + loader.skips.total == n_samples, (samples, loader.skips.as_dict())
    return real / packed, real / (packs * seq_length), samples / packs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="butterfly-shaped samples to write")
    parser.add_argument("--mixed", type=int, default=2000, help="mixed-size samples for the packing measurement")
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per worker setting")
    parser.add_argument("--workers", default="0,1,2", help="worker counts to measure")
    parser.add_argument("--dir", help="where to write the shards (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (num_workers=0 decodes there; workers use 1)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = Path(args.dir or tempfile.mkdtemp(prefix="dfmkit-bench-"))
    try:
        butterfly, mixed = root / "butterfly", root / "mixed"
        for folder in (butterfly, mixed):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        t = time.perf_counter()
        write_dataset(butterfly, [(16, 1, 64, 64)] * args.samples, 1024)
        print(f"wrote {args.samples} butterfly-shaped samples in {time.perf_counter() - t:.1f} s "
              f"({sum(p.stat().st_size for p in butterfly.glob('*.tar')) / args.samples / 1024:.0f} KiB each)")
        print(f"cores: {os.cpu_count()}, main-process torch threads: {torch.get_num_threads()}, "
              f"load average before: {os.getloadavg()[0]:.1f}")
        print("\nthroughput, latent 16x1x64x64 bf16 + ~10x1024 fp32 text, seq_length 8192 (8 samples per pack):")
        print("  (samples per CPU-second: what one core delivers, whatever else the machine runs; "
              "workers' CPU included)")
        for workers in (int(w) for w in args.workers.split(",")):
            load = os.getloadavg()[0]
            sps, bps, per_cpu, skipped = throughput(butterfly, workers, args.seconds)
            print(f"  num_workers={workers}: {sps:7.0f} samples/s  {bps:6.1f} packed batches/s  "
                  f"{per_cpu:6.0f} samples per CPU-second  (load average {load:.1f}, skipped {skipped})")

        if args.mixed <= 0:
            return 0
        write_dataset(mixed, mixed_shapes(args.mixed), 1024)
        print(f"\npacking efficiency, {args.mixed} mixed samples "
              "(images 32..64 latent px a side, ~25% videos of 2-5 latent frames):")
        print("  seq_length  buffer  pad_multiple  real/packed tokens  real/(packs*seq_length)  samples/pack")
        for seq_length, buffer, pad in ((8192, 64, 1), (8192, 64, 8), (8192, 64, 64), (8192, 256, 8), (16384, 256, 8)):
            tokens, fill, per_pack = packing(mixed, seq_length, buffer, pad, args.mixed)
            print(f"  {seq_length:10d}  {buffer:6d}  {pad:12d}  {tokens:18.2%}  {fill:23.2%}  {per_pack:12.1f}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
