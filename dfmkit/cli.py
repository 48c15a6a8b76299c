"""The ``dfmkit`` command line: run, generate, prepare, bench, eval, plugins, recipe show."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from dfmkit.errors import DfmkitError
from dfmkit.version import __version__

log = logging.getLogger("dfmkit")

EPILOG = "Overrides are dotted recipe keys: train.train_iters=20000 parallel.tensor=2 data.path=/x"


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe .toml file, or the name of a packaged recipe (quickstart_digits)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    parser.set_defaults(overrides_anywhere=True)


def cmd_plugins(args: argparse.Namespace) -> int:
    from dfmkit.plugins import default_plugins

    manager = default_plugins()
    rows = manager.describe()
    if args.json:
        print(json.dumps({"components": rows, "skipped": [f.message() for f in manager.failures]}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dfmkit components")
    for column in ("kind", "name", "origin", "summary"):
        table.add_column(column)
    for registry in manager.registries:
        if not len(registry):
            table.add_row(registry.kind, "[dim](none)[/dim]", "", "")
        for component in registry:
            table.add_row(component.kind, component.name, component.origin, component.summary)
    console = Console(width=max(120, Console().width))
    console.print(table)
    for failure in manager.failures:
        console.print(f"[red]skipped[/red] {failure.message()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import os

    import dfmkit
    from dfmkit.data.skips import report
    from dfmkit.processes import children_die_with_this_process
    from dfmkit.train.checkpoint import find_checkpoint
    from dfmkit.train.loop import train

    children_die_with_this_process()  # loader workers, checkpoint writers: nothing outlives a killed run
    overrides = [*args.overrides, *(["data.mock=true"] if args.mock else [])]
    job = dfmkit.build(args.recipe, overrides)
    result = train(job)
    if result["stopped_by_signal"]:
        found = find_checkpoint(result["checkpoint_dir"])
        print(f"stopped at step {result['step']}; {f'checkpoint {found}' if found else 'nothing saved'}",
              file=sys.stderr)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"data: {report(result['skipped_samples'])}")  # summed over the data-parallel ranks
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dfmkit.generation import GenerateError, load, read_prompt_file  # imports torch and megatron: only when used
    from dfmkit.generation.outputs import check_out_dir

    prompts: list[str | dict[str, Any]] = list(args.prompt)
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        raise GenerateError("no prompts: give --prompt TEXT (repeatable) or --prompt-file FILE")
    check_out_dir(Path(args.out))  # before the model is loaded
    generator = load(args.checkpoint, weights=args.weights, overrides=args.overrides, device=args.device,
                     precision=args.precision, tensor=args.tensor, context=args.context, keep_text_encoder=False)
    outputs = generator.generate(prompts, height=args.height, width=args.width, frames=args.frames, steps=args.steps,
                                 guidance=args.guidance, sampler=args.sampler, seed=args.seed, out=args.out,
                                 fps=args.fps, max_tokens=args.max_tokens, cuda_graphs=args.cuda_graphs)
    if generator.env.rank == 0:
        for output in outputs:
            size = f"{output.frames}x{output.height}x{output.width}"
            print(f"{output.path}  seed {output.seed}  {size}  {output.prompt!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from dfmkit.generation.export import export
    from dfmkit.generation.export_format import read_config

    out = export(args.checkpoint, args.out, overwrite=args.overwrite, device=args.device)
    if not dist.is_initialized() or dist.get_rank() == 0:
        config = read_config(out)
        print(f"exported iteration {config['iteration']} ({config['parameters']:,} parameters) to {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch.distributed as dist

    from dfmkit.bench.matrix import parse_layouts, run_matrix, to_markdown, write_results

    try:
        latent = [int(v) for v in args.latent.split(",")]
    except ValueError:
        latent = []
    if len(latent) != 4:
        print(f"error: --latent must be four integers C,T,H,W, got {args.latent!r}", file=sys.stderr)
        return 2
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        print(f"error: --peak-tflops must be a number > 0, got {args.peak_tflops}", file=sys.stderr)
        return 2
    rows = run_matrix(
        [m.strip() for m in args.models.split(",") if m.strip()], parse_layouts(args.layouts),
        seq_length=args.seq_length, latent_shape=latent, text_tokens=args.text_tokens, text_dim=args.text_dim,
        samples_per_pack=args.samples_per_pack, attention=args.attention, warmup=args.warmup, steps=args.steps,
        peak_tflops=args.peak_tflops,
        model={"recompute": args.recompute, "compile": args.compile, "fused_kernels": args.fused_kernels == "on",
               "cuda_graphs": args.cuda_graphs},
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_results(rows, Path(args.out))
        print(to_markdown(rows))
    return 0


def cmd_recipe_show(args: argparse.Namespace) -> int:
    from dfmkit.recipe import dump_recipe, load_recipe

    sys.stdout.write(dump_recipe(load_recipe(args.recipe, args.overrides)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfmkit",
        description="Train and sample Diffusion Transformers (EDM, rectified flow) on megatron-core.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"dfmkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="train a model from a recipe", epilog=EPILOG)
    _add_recipe_arguments(run)
    run.add_argument("--mock", action="store_true", help="train on mock data (data.mock=true)")
    run.set_defaults(func=cmd_run)

    generate = commands.add_parser("generate", help="sample images or videos from a checkpoint or export")
    generate.add_argument("--checkpoint", required=True,
                          help="a checkpoint.dir of `dfmkit run` (newest complete checkpoint), one iter_* folder, or a "
                               "folder written by `dfmkit export`")
    generate.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    generate.add_argument("--prompt-file", help="a text file with one prompt per line, or a .jsonl file of "
                                                '{"prompt": ..., "height": ..., "width": ..., "frames": ...}')
    generate.add_argument("--height", type=int, nargs="+", help="pixels; one value, or one per prompt "
                                                                "(default: the recipe's validation.height)")
    generate.add_argument("--width", type=int, nargs="+", help="pixels; one value or one per prompt")
    generate.add_argument("--frames", type=int, nargs="+",
                          help="video frames (not latent frames); 1 makes images; one value or one per prompt")
    generate.add_argument("--steps", type=int, help="sampler steps (sampler.num_steps)")
    generate.add_argument("--guidance", type=float,
                          help="classifier-free guidance w (1: none; the reference's g is w - 1); a w so large that "
                               "the guided denoiser overflows gives NaN outputs, which are refused")
    generate.add_argument("--sampler",
                          help="a registered sampler (heun, euler, plugins); default: the recipe's")
    generate.add_argument("--seed", type=int, help="output i uses seed + i (default: validation.seed)")
    generate.add_argument("--weights", choices=("ema", "model"), default="ema",
                          help="EMA (default) or raw trained weights")
    generate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    generate.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                          help="model dtype (auto: the recipe's train.precision; bf16 on GPU, fp32 on CPU)")
    generate.add_argument("--tensor", type=int, default=1, help="tensor parallelism (under torchrun)")
    generate.add_argument("--context", type=int,
                          help="context parallelism (under torchrun; default: all processes / --tensor)")
    generate.add_argument("--max-tokens", type=int, default=0,
                          help="latent tokens per packed sequence (0: every prompt in one pack)")
    generate.add_argument("--fps", type=float, default=24.0, help="frame rate of written videos")
    generate.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                          help="on a GPU, run each sampler evaluation eagerly instead of replaying one CUDA graph per "
                               "pack (the graph holds about one forward's activations of GPU memory)")
    generate.add_argument("--out", required=True, help="output folder for NNN.png/NNN.mp4 + NNN.json")
    generate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="a dotted recipe override (repeatable), e.g. --set text_encoder.path=/models/t5-11b")

    generate.set_defaults(func=cmd_generate)

    export = commands.add_parser("export", help="write a checkpoint as safetensors (EMA and raw) + config.json")
    export.add_argument("--checkpoint", required=True, help="a checkpoint.dir of `dfmkit run` or one iter_* folder")
    export.add_argument("--out", required=True, help="a new (or empty) output folder")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    export.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the checkpoint is loaded (the files are the same)")

    export.set_defaults(func=cmd_export)

    prepare = commands.add_parser("prepare", help="encode a dataset into WebDataset shards for training")
    _add_recipe_arguments(prepare)
    prepare.add_argument("--source", required=True,
                         help="'digits' (offline, scikit-learn), 'hf:OWNER/NAME' (needs network), a .parquet file, "
                              "or a folder of images/videos with sidecar .txt captions or captions.jsonl")
    prepare.add_argument("--out", required=True, help="output folder (WebDataset shards + Energon index)")
    prepare.add_argument("--split", help="train,val,test ratios such as 0.9,0.05,0.05 (default: data.split)")
    prepare.add_argument("--format", choices=("safetensors", "npy"), default="safetensors",
                         help="tensor member format in the shards (npy cannot hold bfloat16)")
    prepare.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    prepare.add_argument("--batch-size", type=int, default=16, help="items encoded per tokenizer/text-encoder round")
    prepare.add_argument("--limit", type=int, default=0, help="encode only the first N items (0: all)")
    prepare.add_argument("--image-column", help="parquet/hf: the column of encoded images (default 'image')")
    prepare.add_argument("--caption-column", help="parquet/hf: the column of captions (default 'caption' or 'text')")
    prepare.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")

    def run_prepare(args: argparse.Namespace) -> int:
        from dfmkit.data.prepare import cmd_prepare  # imports torch and energon: only when used

        return cmd_prepare(args)

    prepare.set_defaults(func=run_prepare)

    bench = commands.add_parser("bench", help="measure training throughput and MFU over parallel layouts "
                                              "(on mock packs)")
    bench.add_argument("--mock", action="store_true", help="train on mock packs: the only mode, so optional")
    bench.add_argument("--models", default="S,B,L,XL", help="presets, comma-separated (default S,B,L,XL)")
    bench.add_argument("--layouts", default="tp1cp1,tp2,tp2+sp,cp2,tp2cp2",
                       help="layouts tp<N>[+sp][cp<M>], comma-separated; DP takes the remaining processes")
    bench.add_argument("--seq-length", type=int, default=16384, help="tokens per packed sequence")
    bench.add_argument("--latent", default="16,1,32,32", help="mock latent C,T,H,W (default: 256-token images)")
    bench.add_argument("--text-tokens", type=int, default=77)
    bench.add_argument("--text-dim", type=int, default=1024)
    bench.add_argument("--samples-per-pack", type=int, default=0, help="0: as many as the sequence holds")
    bench.add_argument("--attention", default="torch", help="attention backend")
    bench.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                       help="activation recomputation of the model")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile each DiT layer (model.compile)")
    bench.add_argument("--fused-kernels", default="on", choices=["on", "off"],
                       help="the DiT's Triton kernels on CUDA (model.fused_kernels)")
    bench.add_argument("--cuda-graphs", action="store_true",
                       help="replay the compiled layers as CUDA graphs (model.cuda_graphs; with --compile)")
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--peak-tflops", type=float,
                       help="one device's dense peak for the MFU (default on CUDA: 989, bf16 of an H100/H200; "
                            "none on the CPU, where MFU is n/a)")
    bench.add_argument("--out", default="bench_results", help="folder for bench.json and bench.md")
    bench.set_defaults(func=cmd_bench)

    evaluate = commands.add_parser("eval", help="evaluate generated samples (digit accuracy, FID)")
    from dfmkit.eval.cli import add_eval_arguments

    add_eval_arguments(evaluate)

    plugins = commands.add_parser("plugins", help="list every component with its origin")
    plugins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plugins.set_defaults(func=cmd_plugins)

    recipe = commands.add_parser("recipe", help="inspect recipes")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    show = recipe_commands.add_parser("show", help="print the fully resolved recipe as TOML", epilog=EPILOG)
    _add_recipe_arguments(show)
    show.set_defaults(func=cmd_recipe_show)
    return parser


# Notices that megatron-core prints on every CPU start; they say nothing a dfmkit user can act on.
_QUIET = ("Transformer Engine and Apex are not installed", "full scope is deprecated")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with recipe overrides also accepted after options (`dfmkit run RECIPE --mock
    train.train_iters=10`), which plain argparse refuses once an option has ended the positional list."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides_anywhere", False) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    for text in _QUIET:
        warnings.filterwarnings("ignore", message=f".*{text}.*")
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args) or 0
    except DfmkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
