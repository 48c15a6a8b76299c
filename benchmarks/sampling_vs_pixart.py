"""Sampling speed of dfmkit's DiT-XL against diffusers' PixArt-alpha XL/2 transformer, on one device (issue #29).

Both sample 512 x 512 images (1024 latent tokens, 77 text tokens) with 35-step Heun (2N - 1 = 69 model evaluations,
the last step Euler) and classifier-free guidance w = 8, the conditional and unconditional rows in one forward;
random weights, bf16 on CUDA (float32 on the CPU). Cases: {dfmkit, pixart} x {eager, compiled} x {1, 16 images}.
Each case runs in a fresh process (this script with ``--case``), so no case inherits another's compiled code,
caches or allocator state; a case that fails or times out is reported and the next one runs.

- dfmkit: :func:`dfmkit.bench.sampling.sampling_latency` ("XL", latent 16 x 1 x 64 x 64). Keywords it does not take
  make the case "not supported" instead of failing: ``compile=True`` for dfmkit-compiled, ``repeats`` (passed when
  its signature has it) and ``--dfmkit-kwargs``. It reports the seconds of one call after its own warm-up; its
  ``first_call_seconds`` and ``timed_seconds`` are used when it reports them.
- PixArt: ``diffusers.PixArtTransformer2DModel`` with the PixArt-alpha XL/2 512 configuration (T5-XXL width 4096,
  learned sigma: the first 4 of its 8 output channels are the prediction, read as a velocity), the text mask the
  diffusers pipeline passes (the unconditional rows keep one token, as T5 encodes an empty prompt), sampled by the
  Heun loop below: the time grid is a device tensor and nothing in the loop waits for the device.
  ``torch.compile(transformer)`` (default mode) for pixart-compiled.

Timing: the first call (compilation, warm-up) separately, then ``--repeats`` calls, the median; the device is
synchronised before each clock reading; seconds per image = seconds / images. The ratio is dfmkit / PixArt seconds
per image (below 1: dfmkit is faster). On the GPU machine, from the repository root:

    python benchmarks/sampling_vs_pixart.py --out $OUT/sampling_vs_pixart.json
    python benchmarks/sampling_vs_pixart.py --tiny --images 2 --out /tmp/tiny.json   # tiny models, on a CPU

The JSON has the device, torch and diffusers versions, the dfmkit commit, and per case the first-call seconds, the
timed seconds, their median, seconds per image and the model evaluations per sampling call.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

CASES = ("dfmkit-eager", "dfmkit-compiled", "pixart-eager", "pixart-compiled")
RESULT_PREFIX = "SAMPLING_VS_PIXART "
GUIDANCE = 8.0

# PixArt-alpha XL/2 at 512 px as diffusers' conversion script builds it (sample_size = 512 / 8, interpolation
# scale 1; no resolution/aspect-ratio micro-conditions below sample_size 128).
PIXART_XL_512 = dict(sample_size=64, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
                     attention_head_dim=72, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
                     activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                     norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1,
                     use_additional_conditions=False)
PIXART_TINY = {**PIXART_XL_512, "sample_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
               "cross_attention_dim": 32, "caption_channels": 64}
PIXART_TEXT_TOKENS = {False: 77, True: 8}  # by --tiny
# (preset, latent shape, text tokens, text width): the token counts of the PixArt configuration beside it.
DFMKIT_XL_512 = ("XL", (16, 1, 64, 64), 77, None)  # text width: sampling_latency's default
DFMKIT_TINY = ("tiny", (16, 1, 8, 8), 8, 64)


def _device() -> tuple[torch.device, torch.dtype, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    return torch.device("cpu"), torch.float32, "cpu"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(run, repeats: int, device: torch.device) -> dict[str, Any]:
    """Seconds of the first call of ``run`` and of ``repeats`` more, and their median."""
    timed = []
    for _ in range(repeats + 1):
        _synchronize(device)
        start = time.perf_counter()
        run()
        _synchronize(device)
        timed.append(time.perf_counter() - start)
    return {"first_call_seconds": timed[0], "timed_seconds": timed[1:], "seconds": statistics.median(timed[1:])}


def heun_sampler(velocity, grid: torch.Tensor):
    """``sample(noise)``: Heun steps of ``dx/dt = velocity(x, i)`` over the device tensor ``grid`` of times, the last
    step Euler (2 steps - 1 evaluations); ``velocity(x, i)`` is evaluated at ``grid[i]``. Grid values are only read on
    the device, so the loop queues its work without waiting for it."""
    dt, steps = grid.diff(), len(grid) - 1

    def sample(noise: torch.Tensor) -> torch.Tensor:
        x = noise
        for i in range(steps):
            d = velocity(x, i)
            x_next = x + dt[i] * d
            if i < steps - 1:
                x_next = x + dt[i] * (0.5 * d + 0.5 * velocity(x_next, i + 1))
            x = x_next
        return x

    return sample


def run_pixart(spec: dict[str, Any]) -> dict[str, Any]:
    import diffusers

    device, dtype, device_name = _device()
    config = PIXART_TINY if spec["tiny"] else PIXART_XL_512
    images, steps, text_tokens = spec["images"], spec["steps"], PIXART_TEXT_TOKENS[spec["tiny"]]
    torch.manual_seed(0)
    with torch.device(device):  # random weights made on the device: seconds instead of a minute on the host
        transformer = diffusers.PixArtTransformer2DModel(**config)
    transformer = transformer.to(device, dtype).eval().requires_grad_(False)
    model = torch.compile(transformer) if spec["compile"] else transformer

    rows = 2 * images  # conditional rows, then unconditional ones
    text = torch.randn(rows, text_tokens, config["caption_channels"], device=device, dtype=dtype)
    text_mask = torch.ones(rows, text_tokens, device=device, dtype=dtype)
    text_mask[images:, 1:] = 0
    channels, size = config["in_channels"], config["sample_size"]
    grid = torch.linspace(1.0, 0.0, steps + 1, device=device)
    timesteps = grid * 999  # PixArt's timestep scale, [0, 1000)
    evaluations = 0

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        out = model(torch.cat([x, x]).to(dtype), encoder_hidden_states=text, encoder_attention_mask=text_mask,
                    timestep=timesteps[i].expand(rows), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)[0]
        cond, uncond = out[:, :channels].float().chunk(2)  # learned sigma: the other channels are the variance
        return uncond + GUIDANCE * (cond - uncond)

    sample = heun_sampler(velocity, grid)
    generator = torch.Generator(device).manual_seed(0)

    @torch.no_grad()
    def run() -> None:
        # the latents end on the host, as dfmkit's do
        sample(torch.randn(images, channels, size, size, device=device, generator=generator)).cpu()

    timing = time_calls(run, spec["repeats"], device)
    return {**timing, "evaluations": evaluations // (spec["repeats"] + 1), "evaluations_counted": True,
            "tokens_per_image": (size // config["patch_size"]) ** 2, "text_tokens": text_tokens,
            "parameters": sum(p.numel() for p in transformer.parameters()), "device": device_name,
            "dtype": str(dtype).removeprefix("torch."), "diffusers": diffusers.__version__}


def dfmkit_keywords(spec: dict[str, Any]) -> dict[str, Any]:
    """The keywords of the case's sampling_latency call; TypeError naming those its signature does not take."""
    from dfmkit.bench.sampling import sampling_latency

    preset, latent_shape, text_tokens, text_dim = DFMKIT_TINY if spec["tiny"] else DFMKIT_XL_512
    wanted = {**spec["dfmkit_kwargs"], **({"compile": True} if spec["compile"] else {})}
    keywords = dict(preset=preset, images=spec["images"], latent_shape=latent_shape, steps=spec["steps"],
                    guidance=GUIDANCE, text_tokens=text_tokens, **({"text_dim": text_dim} if text_dim else {}))
    parameters = inspect.signature(sampling_latency).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    missing = [name for name in wanted if name not in parameters and not takes_any]
    if missing:
        raise TypeError(f"dfmkit.bench.sampling.sampling_latency takes no {', '.join(map(repr, missing))} keyword")
    if "repeats" in parameters:
        keywords["repeats"] = spec["repeats"]
    return {**keywords, **wanted}


def run_dfmkit(spec: dict[str, Any]) -> dict[str, Any]:
    from dfmkit.bench.sampling import sampling_latency

    row = sampling_latency(**dfmkit_keywords(spec))
    timed = row.get("timed_seconds", [row["seconds"]])
    return {"first_call_seconds": row.get("first_call_seconds"), "timed_seconds": timed,
            "seconds": statistics.median(timed),
            # sampling_latency does not count its model calls; Heun's 2N - 1 unless it reports them
            "evaluations": row.get("evaluations", 2 * spec["steps"] - 1),
            "evaluations_counted": "evaluations" in row, "tokens_per_image": row["tokens_per_image"],
            "tflops": row.get("tflops"), "device": row["device"],
            "dtype": "bfloat16" if torch.cuda.is_available() else "float32"}


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """One case in this process (the child side of ``--case``)."""
    result = (run_dfmkit if spec["model"] == "dfmkit" else run_pixart)(spec)
    return {**result, "seconds_per_image": result["seconds"] / spec["images"]}


def case_spec(name: str, images: int, args: argparse.Namespace) -> dict[str, Any]:
    model, mode = name.split("-")
    return {"case": name, "model": model, "compile": mode == "compiled", "images": images, "steps": args.steps,
            "repeats": args.repeats, "tiny": args.tiny, "dfmkit_kwargs": args.dfmkit_kwargs}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def run_in_fresh_process(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The case's result from a new Python process, or ``status`` "failed" with the error's last line."""
    row = {**spec, "status": "failed"}
    if spec["model"] == "dfmkit":
        try:
            dfmkit_keywords(spec)
        except TypeError as error:  # the case cannot run: no process for it
            return {**row, "status": "not supported", "error": str(error)}
    start = time.perf_counter()
    # its own process group (in this session), so that a case stopped early takes its helpers (compile workers)
    with subprocess.Popen([sys.executable, __file__, "--case", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, process_group=0) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except BaseException as stopped:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            if not isinstance(stopped, subprocess.TimeoutExpired):
                raise
            sys.stderr.write(stderr[-3000:])
            return {**row, "error": f"timed out after {timeout:g} s", "process_seconds": time.perf_counter() - start}
    row["process_seconds"] = time.perf_counter() - start
    results = [line[len(RESULT_PREFIX):] for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not results:
        sys.stderr.write(stderr[-3000:])
        return {**row, "error": f"exit code {child.returncode}: {_last_line(stderr)}"}
    return {**row, **json.loads(results[-1]), "status": "ok"}


def ratios(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """dfmkit / PixArt seconds per image for each (mode, images) where both ran."""
    done = {(c["model"], c["compile"], c["images"]): c for c in cases if c["status"] == "ok"}
    rows = []
    for (model, compile, images), dfmkit in done.items():
        pixart = done.get(("pixart", compile, images))
        if model == "dfmkit" and pixart:
            rows.append({"mode": "compiled" if compile else "eager", "images": images,
                         "dfmkit_seconds_per_image": dfmkit["seconds_per_image"],
                         "pixart_seconds_per_image": pixart["seconds_per_image"],
                         "dfmkit_over_pixart": dfmkit["seconds_per_image"] / pixart["seconds_per_image"]})
    return rows


def table(cases: list[dict[str, Any]], images: list[int]) -> str:
    """Markdown: seconds per image (first call in parentheses) and the ratio per (images, mode); then errors."""
    by_key = {(c["model"], c["compile"], c["images"]): c for c in cases}

    def cell(model: str, compile: bool, n: int) -> str:
        c = by_key.get((model, compile, n))
        if c is None:
            return "-"
        if c["status"] != "ok":
            return c["status"]
        first = c.get("first_call_seconds")
        return f"{c['seconds_per_image']:.3g}" + (f" ({first:.3g} s)" if first is not None else "")

    ratio = {(r["mode"] == "compiled", r["images"]): r["dfmkit_over_pixart"] for r in ratios(cases)}
    lines = ["| images | mode | dfmkit s/image (first call) | PixArt s/image (first call) | dfmkit / PixArt |",
             "|---|---|---|---|---|"]
    for n in images:
        for compile in (False, True):
            if not any((m, compile, n) in by_key for m in ("dfmkit", "pixart")):
                continue
            r = ratio.get((compile, n))
            lines.append(f"| {n} | {'compiled' if compile else 'eager'} | {cell('dfmkit', compile, n)} | "
                         f"{cell('pixart', compile, n)} | {'-' if r is None else f'{r:.2f}'} |")
    lines += [f"{c['case']}, {c['images']} image(s): {c['status']}: {c['error']}" for c in cases if c["status"] != "ok"]
    return "\n".join(lines)


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results to this JSON file (after every case)")
    parser.add_argument("--images", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, help="Heun steps (default 35; 3 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first (median reported)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps, to test the script on a CPU")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds a case may take")
    parser.add_argument("--dfmkit-kwargs", type=json.loads, default={},
                        help='more keywords for sampling_latency, as JSON (e.g. \'{"fast": true}\')')
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child side: one case's JSON spec
    args = parser.parse_args(argv)

    if args.case:
        print(RESULT_PREFIX + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as an exception, which stops the running case too
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in names if name not in CASES]
    if unknown or args.repeats < 1:
        parser.error(f"unknown case(s) {', '.join(unknown)}; cases are {', '.join(CASES)}" if unknown
                     else "--repeats must be at least 1")
    args.steps = args.steps or (3 if args.tiny else 35)
    results: dict[str, Any] = {
        "benchmark": "sampling_vs_pixart", "device": "unknown", "torch": torch.__version__,
        "diffusers": _version("diffusers"), "dfmkit_commit": git_commit(),
        "settings": {"steps": args.steps, "evaluations": 2 * args.steps - 1, "guidance": GUIDANCE,
                     "images": args.images, "repeats": args.repeats, "tiny": args.tiny,
                     "dfmkit_kwargs": args.dfmkit_kwargs,
                     "pixart_config": PIXART_TINY if args.tiny else PIXART_XL_512,
                     "dfmkit_case": dict(zip(("preset", "latent_shape", "text_tokens", "text_dim"),
                                             DFMKIT_TINY if args.tiny else DFMKIT_XL_512))},
        "cases": [], "ratios": [],
    }
    for images in args.images:
        for name in names:
            row = run_in_fresh_process(case_spec(name, images, args), args.timeout)
            results["cases"].append(row)
            if row["status"] == "ok":
                results["device"] = row["device"]
                first = row["first_call_seconds"]
                print(f"{name}, {images} image(s): {row['seconds_per_image']:.4f} s/image, first call "
                      f"{'not reported' if first is None else f'{first:.3g} s'}, {row['evaluations']} evaluations",
                      flush=True)
            else:
                print(f"{name}, {images} image(s): {row['status']}: {row['error']}", flush=True)
            results["ratios"] = ratios(results["cases"])
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['device']}, torch {results['torch']}, diffusers {results['diffusers']}, dfmkit "
          f"{results['dfmkit_commit']}; {args.steps} Heun steps ({2 * args.steps - 1} evaluations), guidance "
          f"{GUIDANCE:g}{', tiny models' if args.tiny else ''}")
    print(table(results["cases"], args.images))
    return 1 if any(c["status"] == "failed" for c in results["cases"]) else 0


if __name__ == "__main__":
    sys.exit(main())
