"""Prompt adherence for the digits quickstart: does each generated image show the digit its prompt asked for?

The quickstart trains on scikit-learn's ``load_digits`` (1797 images of 8x8, values 0..16 with 0 the
background), upsampled, with the caption ``"a handwritten digit K"``. The data pipeline maps 0..16 to
[-1, 1], so generated PNGs show light strokes on a black background.

How a sample is read:

1. its prompt comes from the sidecar ``NNN.json`` next to ``NNN.png`` (as ``dfmkit generate`` and
   validation write them) and must be exactly ``"a handwritten digit K"`` with K in 0..9. Any other
   prompt is an error naming the file, unless ``skip_other_prompts`` is set: then the sample is skipped
   and listed under ``skipped`` in the report (it never counts as right or wrong).
2. the image, at any resolution and RGB or grey, becomes grey (mean of R, G, B), is downsampled to
   8x8 by **area averaging** (each output pixel is the mean of the input pixels it covers; exact block
   means when the sides are multiples of 8) and is mapped from 0..255 to the digits' 0..16 scale.
3. a scikit-learn ``SVC`` (RBF kernel, gamma=0.001, C=1, on the raw 0..16 pixels) classifies it. The
   classifier is trained on a stratified 80% of ``load_digits`` (seed 0), plus a copy of each training
   digit rendered at 32x32 (bilinear, as the data pipeline upsamples) and area-downsampled back, so the
   slight blur of that round trip is not new to it. The other 20% (360 digits) give the held-out
   accuracy printed with every report, on the original 8x8 digits and after the same 32x32 round trip
   that generated images go through: the ceiling a perfect generator would reach.
4. an image whose 8x8 reading is (nearly) constant, a standard deviation below ``BLANK_STD`` = 1.0 on
   the 0..16 scale, shows no digit: it counts as wrong and is listed under ``blank``, whatever the
   classifier reads (it reads an all-black image as a 1). Every real digit is far above: the least
   contrasted of ``load_digits`` has 4.8 at 8x8 and 3.7 after the 32x32 round trip.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dfmkit.eval import EvalError, list_images, read_image

PROMPT_PATTERN = re.compile(r"a handwritten digit ([0-9])")
PROMPT_FORM = "a handwritten digit K"
CLASSIFIER_SEED = 0
HELDOUT_FRACTION = 0.2
ROUND_TRIP_SIZE = 32
BLANK_STD = 1.0  # below this pixel std (0..16 scale) an 8x8 reading shows no digit


def prompt_digit(prompt: str) -> int | None:
    """The digit K of exactly ``"a handwritten digit K"``, else None (no trimming, no other wording)."""
    match = PROMPT_PATTERN.fullmatch(prompt) if isinstance(prompt, str) else None
    return int(match.group(1)) if match else None


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise EvalError("the digits evaluation needs scikit-learn: pip install scikit-learn") from exc
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def render_digits(grids: np.ndarray, size: int, grey: bool = False) -> np.ndarray:
    """8x8 digits in 0..16 ``[N, 8, 8]`` -> uint8 images ``[N, size, size, 3]`` (or ``[N, size, size]`` if grey).

    Bilinear upsampling (align_corners=False) and 0..16 -> 0..255, the same pixels the data pipeline
    feeds the model (0..16 -> [-1, 1]) written back as PNG values.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(grids, dtype=np.float32))[:, None] / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x[:, 0].clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return images if grey else np.repeat(images[..., None], 3, axis=-1)


def to_digit_grid(image: np.ndarray) -> np.ndarray:
    """An image ``[H, W]`` or ``[H, W, C]`` (uint8) -> ``[8, 8]`` float in 0..16, by area averaging."""
    import torch
    import torch.nn.functional as F

    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey[..., :3].mean(axis=-1)
    x = torch.from_numpy(np.ascontiguousarray(grey))[None, None]
    small = F.interpolate(x, size=(8, 8), mode="area")[0, 0].numpy()  # area = adaptive average pooling
    return small * (16.0 / 255.0)


@dataclass
class DigitClassifier:
    """The SVC that reads 8x8 digits, with its held-out accuracy on real digits."""

    model: Any
    train_count: int
    heldout_indices: np.ndarray
    heldout_accuracy: float  # on the original 8x8 held-out digits
    heldout_accuracy_rendered: float  # on the same digits rendered at ROUND_TRIP_SIZE and read back

    description = "SVC (RBF kernel, gamma=0.001, C=1) on the raw 0..16 pixels of scikit-learn's load_digits"

    def predict(self, grids: np.ndarray) -> np.ndarray:
        grids = np.asarray(grids, dtype=np.float64)
        return self.model.predict(grids.reshape(len(grids), 64)).astype(np.int64)

    def summary(self) -> dict[str, Any]:
        return {
            "classifier": self.description,
            "train_count": self.train_count,
            "heldout_count": int(len(self.heldout_indices)),
            "heldout_accuracy": self.heldout_accuracy,
            f"heldout_accuracy_rendered_{ROUND_TRIP_SIZE}px": self.heldout_accuracy_rendered,
        }


def _round_trip(grids: np.ndarray, size: int = ROUND_TRIP_SIZE) -> np.ndarray:
    """Digits rendered as ``size`` x ``size`` uint8 images and read back as :func:`to_digit_grid` does (batched)."""
    import torch
    import torch.nn.functional as F

    images = torch.from_numpy(render_digits(grids, size, grey=True)).float()[:, None]
    return F.interpolate(images, size=(8, 8), mode="area")[:, 0].numpy() * (16.0 / 255.0)


@functools.lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The classifier, trained once per process (about 0.3 s) and deterministic."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = _load_digits()
    train, heldout = train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=labels, random_state=CLASSIFIER_SEED
    )
    x_train = np.concatenate([images[train], _round_trip(images[train])]).reshape(-1, 64)
    y_train = np.concatenate([labels[train], labels[train]])
    model = SVC(gamma=0.001, C=1.0).fit(x_train, y_train)
    classifier = DigitClassifier(model, len(train), np.sort(heldout), 0.0, 0.0)
    classifier.heldout_accuracy = float((classifier.predict(images[heldout]) == labels[heldout]).mean())
    rendered = _round_trip(images[heldout])
    classifier.heldout_accuracy_rendered = float((classifier.predict(rendered) == labels[heldout]).mean())
    return classifier


def _read_prompt(image_path: Path) -> str:
    sidecar = image_path.with_suffix(".json")
    if not sidecar.is_file():
        raise EvalError(f"{image_path}: no sidecar {sidecar.name} with the prompt next to it")
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{sidecar}: not a readable JSON file ({exc})") from exc
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str):
        raise EvalError(f"{sidecar}: expected a JSON object with a string 'prompt'")
    return prompt


@dataclass
class DigitsReport:
    """Accuracy of the classifier's reading against the requested digit, per digit and overall."""

    samples: str
    count: int  # samples scored (skipped ones excluded, blank ones included)
    correct: int
    accuracy: float
    per_digit: dict[int, dict[str, Any]]  # requested digit -> count, correct, blank, accuracy, read_as {digit: n}
    confusion: list[list[int]]  # [requested][predicted], 10 x 10, of the samples that are not blank
    image_sizes: list[str]
    classifier: dict[str, Any]
    skipped: list[dict[str, str]] = field(default_factory=list)
    blank: list[str] = field(default_factory=list)  # files that show no digit; each counts as wrong
    warnings: list[str] = field(default_factory=list)
    readings: list[dict[str, Any]] = field(default_factory=list)  # per sample: file, requested, read_as (None: blank)
    method: str = (f"grey = mean of RGB; downsampled to 8x8 by area averaging; 0..255 -> 0..16; "
                   f"std below {BLANK_STD} = blank, counted wrong; prompts must be exactly '{PROMPT_FORM}'")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_digit"] = {str(k): v for k, v in self.per_digit.items()}
        return data

    def format_text(self) -> str:
        c = self.classifier
        lines = [
            f"digits prompt adherence: {self.count} samples in {self.samples} ({', '.join(self.image_sizes)})",
            f"classifier: {c['classifier']}; trained on {c['train_count']} digits; held-out accuracy on "
            f"{c['heldout_count']} real digits {c['heldout_accuracy']:.1%} at 8x8, "
            f"{c[f'heldout_accuracy_rendered_{ROUND_TRIP_SIZE}px']:.1%} rendered at {ROUND_TRIP_SIZE}px",
            f"method: {self.method}",
            "",
            f"{'digit':>7}  {'samples':>7}  {'correct':>7}  {'accuracy':>8}  read as (wrong only)",
        ]
        for digit, row in sorted(self.per_digit.items()):
            wrong = [f"{d} ({n})" for d, n in sorted(row["read_as"].items(), key=lambda kv: -kv[1]) if int(d) != digit]
            wrong += [f"blank ({row['blank']})"] if row["blank"] else []
            lines.append(f"{digit:>7}  {row['count']:>7}  {row['correct']:>7}  {row['accuracy']:>8.1%}  "
                         f"{', '.join(wrong)}")
        lines.append(f"{'overall':>7}  {self.count:>7}  {self.correct:>7}  {self.accuracy:>8.1%}")
        if self.blank:
            lines.append(f"{len(self.blank)} blank sample(s) (no digit: pixel std below {BLANK_STD} of 16 at 8x8), "
                         "counted wrong: " + ", ".join(self.blank[:5]) + (" ..." if len(self.blank) > 5 else ""))
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} sample(s) whose prompt is not '{PROMPT_FORM}': "
                         + ", ".join(s["file"] for s in self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else ""))
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def evaluate_digits(samples: str | Path, *, skip_other_prompts: bool = False) -> DigitsReport:
    """Read every ``NNN.png`` in ``samples`` with the digit classifier and compare with its prompt's digit."""
    files = list_images(samples, role="samples")
    requested: list[int] = []
    grids: list[np.ndarray] = []
    scored: list[Path] = []
    sizes: set[str] = set()
    skipped: list[dict[str, str]] = []
    for path in files:
        prompt = _read_prompt(path)
        digit = prompt_digit(prompt)
        if digit is None:
            if not skip_other_prompts:
                raise EvalError(
                    f"{path.with_suffix('.json')}: prompt {prompt!r} is not exactly '{PROMPT_FORM}' (K = 0..9); "
                    "pass --skip-other-prompts to skip such samples"
                )
            skipped.append({"file": path.name, "prompt": prompt})
            continue
        image = read_image(path)
        sizes.add(f"{image.shape[0]}x{image.shape[1]}")
        requested.append(digit)
        grids.append(to_digit_grid(image))
        scored.append(path)
    if not grids:
        raise EvalError(f"samples folder {str(samples)!r}: none of its {len(files)} images has a digit prompt "
                        f"('{PROMPT_FORM}')")
    classifier = digit_classifier()
    stacked = np.stack(grids)
    blank = stacked.reshape(len(grids), -1).std(axis=1) < BLANK_STD
    predicted = classifier.predict(stacked)
    wanted = np.asarray(requested)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (wanted[~blank], predicted[~blank]), 1)
    per_digit = {}
    for digit in sorted(set(requested)):
        row = confusion[digit]
        blanks = int(blank[wanted == digit].sum())
        count = int(row.sum()) + blanks
        per_digit[digit] = {"count": count, "correct": int(row[digit]), "blank": blanks,
                            "accuracy": float(row[digit] / count),
                            "read_as": {str(d): int(n) for d, n in enumerate(row) if n}}
    correct = int(np.trace(confusion))
    warnings = []
    mean_level = float(np.mean(grids))
    if mean_level > 8.0:
        warnings.append(f"the images are mostly bright (mean {mean_level:.1f} of 16): the digits data is light "
                        "strokes on a black background, so inverted images are misread")
    return DigitsReport(
        samples=str(samples), count=len(requested), correct=correct, accuracy=correct / len(requested),
        per_digit=per_digit, confusion=confusion.tolist(), image_sizes=sorted(sizes),
        classifier=classifier.summary(), skipped=skipped, blank=[p.name for p, b in zip(scored, blank) if b],
        warnings=warnings,
        readings=[{"file": str(path), "requested": int(want), "read_as": None if empty else int(got)}
                  for path, want, got, empty in zip(scored, wanted, predicted, blank)],
    )


def write_digit_grid(report: DigitsReport, out: str | Path, cell: int = 48, gap: int = 4) -> Path:
    """A PNG of the scored samples: one column per requested digit 0..9, one row per sample of it, each
    image scaled to ``cell`` pixels (nearest); a sample the classifier read as another digit is framed red."""
    from PIL import Image

    columns: dict[int, list[dict[str, Any]]] = {d: [] for d in range(10)}
    for reading in report.readings:
        columns[reading["requested"]].append(reading)
    rows = max((len(c) for c in columns.values()), default=0)
    if rows == 0:
        raise EvalError("no scored samples to draw")
    step = cell + gap
    grid = Image.new("RGB", (10 * step + gap, rows * step + gap), (40, 40, 40))
    for digit, readings in columns.items():
        for row, reading in enumerate(readings):
            x, y = gap + digit * step, gap + row * step
            if reading["read_as"] != digit:
                grid.paste((200, 30, 30), (x - gap // 2, y - gap // 2, x + cell + gap // 2, y + cell + gap // 2))
            image = Image.fromarray(read_image(reading["file"])).convert("RGB")
            grid.paste(image.resize((cell, cell), Image.NEAREST), (x, y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
