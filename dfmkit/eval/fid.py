"""Frechet distance (FID) between a folder of generated images and a reference folder.

FID fits a Gaussian (mean, covariance) to the feature vectors of each image set and reports

    ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

computed in float64. The trace of the matrix square root is taken without ``scipy.linalg.sqrtm``:
``tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i)`` where ``lambda_i`` are the eigenvalues of the
symmetric positive semi-definite ``S_1^(1/2) S_2 S_1^(1/2)`` (same spectrum as ``S_1 S_2``), with
``S_1^(1/2)`` from a symmetric eigendecomposition and rounding-level negative eigenvalues clipped to 0.
This needs no complex arithmetic and no ``eps * I`` fix-up for singular covariances (fewer images than
feature dimensions), where ``sqrtm`` is known to struggle; it agrees with the ``sqrtm`` route. With fewer
images than dimensions, :func:`fid_from_features` takes the same trace from the singular values of an
N1 x N2 matrix instead (exact, and far cheaper than two 2048 x 2048 eigendecompositions).

Feature networks, chosen by ``feature_net``:

``inception`` — the standard one. The FID Inception-v3 of TTUR / pytorch-fid (TensorFlow's
  2015-12-05 Inception graph ported to PyTorch; 2048-d features of the final average pool; every
  image converted to RGB in [0, 1], resized to 299x299 bilinearly (align_corners=False, no antialias,
  as pytorch-fid does) and scaled to [-1, 1]). The architecture is written here in plain torch
  (torchvision is not required): torchvision's Inception3 layout with num_classes=1008, no auxiliary
  head, and pytorch-fid's FID patches (average pools that exclude padding in Mixed_5b-d, 6b-e and 7b,
  a max pool in Mixed_7c's pool branch). Its weights are never downloaded: give the state dict
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's file; torch-fidelity ships the same file as
  ``weights-inception-2015-12-05-6726825d.pth``) with ``inception_weights=PATH``, the environment
  variable ``DFMKIT_INCEPTION_WEIGHTS``, or leave it in torch hub's cache
  (``$TORCH_HOME/hub/checkpoints/``, where pytorch-fid puts it), where it is found on its own. It is
  read with ``torch.load(weights_only=True)`` and must have exactly the architecture's keys and
  shapes. What has been checked offline: the key set and every shape against the architecture; the
  parameter count (23,850,960: torchvision's published 27,161,264 for inception_v3 less the auxiliary
  head, with a 1008-way classifier); and, once, outside the test suite (torchvision is no dependency),
  that with the same random weights this module's features are bit-identical to those of pytorch-fid
  0.3.0's InceptionV3 (on torchvision 0.29.2) at input sizes 16 to 400, and this module's distance
  equal to pytorch-fid's ``calculate_frechet_distance`` to 1e-15 relative. What has NOT been checked
  here, for want of the file: the official weights themselves. Values from this network are meant to
  equal pytorch-fid's, which are close to but not identical with TensorFlow's (resizing differs); for
  numbers to put next to published ones, prefer the tool the publication used.

``random-conv`` — the offline default when no Inception weights are found. A small fixed convolutional
  network whose weights are drawn from numpy's legacy ``RandomState(0)`` (a stream numpy keeps fixed
  across versions), so every installation builds the same network without any file: input resized to
  64x64 (bilinear, antialiased when shrinking) in [-1, 1]; four stages of 3x3 convolution (He-normal
  weights, no bias), ReLU and 2x2 average pooling, with 32, 64, 128 and 256 channels; the 480-d feature
  vector concatenates each stage's global average. Random-weight convolutional features are a known
  training-free embedding for generative-model metrics; they respond strongly to low-level statistics
  (noise, contrast, brightness, blur, stroke texture) and only weakly to which classes are present
  (400 vs 400 real digits at 32x32: keeping only the digits 0-4 raised FID 3.3x over two sets of the
  same distribution, adding 40/255 brightness 1100x, Gaussian noise of sigma 20/255 16x), so for the
  digits, class adherence is ``dfmkit eval digits``' job.
  Pixel-space features were the other candidate and were rejected: at 8x8 they do not see added noise
  at all. **Values from this network are NOT comparable with published FIDs**, nor with Inception FIDs,
  only with other values from the same network (the report names it with a fingerprint of its
  weights) at the same sample counts.

FID is biased upward for small sample counts and depends on them: compare runs at equal counts.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfmkit.eval import EvalError, list_images, read_image

INCEPTION_ENV = "DFMKIT_INCEPTION_WEIGHTS"
#: File names of the FID Inception weights; the part after the last '-' is their sha256 prefix (torch hub's naming).
INCEPTION_FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_PARAMETERS = 23_850_960
FEATURE_NETS = ("auto", "inception", "random-conv")
#: The reference that renders scikit-learn's digits at the samples' size instead of reading a folder.
SKLEARN_DIGITS = "sklearn:digits"


# --------------------------------------------------------------------------------------------
# The distance
# --------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, as in TTUR/pytorch-fid) of ``[N, D]`` features, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise EvalError(f"FID needs at least 2 images per set, got {x.shape[0] if x.ndim else 0}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S_1 S_2)^(1/2))`` for covariances S_1, S_2, via eigenvalues of ``S_1^(1/2) S_2 S_1^(1/2)``."""
    root = _psd_sqrt(np.asarray(sigma1, dtype=np.float64))
    inner = root @ np.asarray(sigma2, dtype=np.float64) @ root
    values = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); >= 0 (rounding below 0 is clipped)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise EvalError(f"feature statistics do not match: means {mu1.shape} and {mu2.shape}, "
                        f"covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(distance), 0.0)


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]``.

    With fewer images than feature dimensions (N1 + N2 <= D, common for small evaluations with 2048-d
    Inception features) it never forms a D x D matrix: with centred, scaled features ``A = (X1 - mu1) /
    sqrt(N1 - 1)`` and ``B`` alike, ``S1 = A^T A`` and ``S2 = B^T B``, so the non-zero eigenvalues of
    ``S1 S2`` are those of ``(A B^T)(A B^T)^T`` and ``tr((S1 S2)^(1/2))`` is the sum of the singular
    values of the small ``A B^T``. Otherwise it goes through :func:`frechet_distance`. Both give the
    same value up to rounding.
    """
    x1, x2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    for x in (x1, x2):
        if x.ndim != 2 or x.shape[0] < 2:
            raise EvalError(f"FID needs at least 2 images per set, got {x.shape[0] if x.ndim else 0}")
    if x1.shape[1] != x2.shape[1]:
        raise EvalError(f"feature sets of different widths: {x1.shape[1]} and {x2.shape[1]}")
    if x1.shape[0] + x2.shape[0] > x1.shape[1]:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    a = (x1 - mu1) / np.sqrt(x1.shape[0] - 1)
    b = (x2 - mu2) / np.sqrt(x2.shape[0] - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.sum(a * a) + np.sum(b * b) - 2.0 * trace_sqrt
    return max(float(distance), 0.0)


# --------------------------------------------------------------------------------------------
# The FID Inception-v3 (pytorch-fid's layout, plain torch)
# --------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool_branch(x: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "max":  # pytorch-fid's FIDInceptionE_2 (Mixed_7c): max pooling, as the TF graph has it
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    # TensorFlow's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_pool_branch(x, "avg"))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_pool_branch(x, "avg"))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(_pool_branch(x, self.pool))], 1)


class FIDInceptionV3(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] -> ``[B, 2048]`` pool features, as pytorch-fid's InceptionV3 block 3."""

    input_size = 299
    dims = 2048

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # in the weights file; unused for FID features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception(path: str | Path) -> FIDInceptionV3:
    """The FID Inception with the state dict at ``path``; keys and shapes must match exactly.

    ``num_batches_tracked`` buffers may be present or absent (they do not affect evaluation).
    """
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"Inception weights {str(path)!r} not found (expected pytorch-fid's "
                        f"{INCEPTION_FILE_NAMES[0]})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file: pickle, zip, unsupported globals
        raise EvalError(f"cannot load Inception weights {str(path)!r} as a torch state dict "
                        f"(torch.load, weights_only=True): {str(exc).splitlines()[0][:300]}. Expected pytorch-fid's "
                        f"{INCEPTION_FILE_NAMES[0]}; TorchScript files such as StyleGAN's inception-2015-12-05.pt "
                        "are not this format") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"Inception weights {str(path)!r}: expected a state dict (parameter name -> tensor)")
    with torch.device("meta"):  # shapes only: the file supplies every value
        model = FIDInceptionV3()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong_shape:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = ([f"{len(missing)} missing key(s): {some(missing)}"] if missing else []) + (
            [f"{len(unexpected)} unexpected key(s): {some(unexpected)}"] if unexpected else []) + (
            [f"{len(wrong_shape)} key(s) of the wrong shape: " + some(
                [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong_shape])]
            if wrong_shape else [])
        raise EvalError(f"Inception weights {str(path)!r} do not fit the FID Inception-v3 (pytorch-fid layout): "
                        + "; ".join(problems))
    tensors = {k: torch.zeros((), dtype=torch.long) for k in optional}
    tensors.update({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def find_inception_weights(explicit: str | Path | None = None) -> tuple[Path | None, str]:
    """Where the Inception weights are (explicit path, then ``$DFMKIT_INCEPTION_WEIGHTS``, then torch hub's cache).

    Returns the path (None when absent) and where it came from. A path that was asked for and is
    missing is an error.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise EvalError(f"--inception-weights {str(explicit)!r}: no such file")
        return path, "--inception-weights"
    env = os.environ.get(INCEPTION_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise EvalError(f"${INCEPTION_ENV}={env!r}: no such file")
        return path, f"${INCEPTION_ENV}"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    for name in INCEPTION_FILE_NAMES:
        if (hub / name).is_file():
            return hub / name, "torch hub cache"
    return None, f"looked for {INCEPTION_FILE_NAMES[0]} in --inception-weights, ${INCEPTION_ENV} and {hub}"


# --------------------------------------------------------------------------------------------
# The offline network
# --------------------------------------------------------------------------------------------


class RandomConvFeatures(nn.Module):
    """A fixed random-weight conv net: ``[B, 3, H, W]`` in [0, 1] -> ``[B, 480]`` (see the module docstring)."""

    input_size = 64
    channels = (32, 64, 128, 256)
    dims = sum(channels)

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        rng = np.random.RandomState(seed)  # legacy generator: numpy keeps its stream fixed across versions
        self.seed = seed
        self.convs = nn.ModuleList()
        cin = 3
        for cout in self.channels:
            conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            weight = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (cin * 9))  # He-normal
            conv.weight.data = torch.from_numpy(weight.astype(np.float32))
            self.convs.append(conv)
            cin = cout
        self.requires_grad_(False).eval()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for conv in self.convs:
            digest.update(conv.weight.detach().numpy().tobytes())
        return digest.hexdigest()[:12]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        shrinking = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
        x = 2 * x - 1
        pooled = []
        for conv in self.convs:
            x = F.avg_pool2d(F.relu(conv(x)), 2)
            pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, 1)


# --------------------------------------------------------------------------------------------
# Feature extraction and the report
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureNetwork:
    name: str  # "inception" or "random-conv"
    description: str
    comparable_with_published: bool
    module: nn.Module
    weights: str | None = None  # file path for inception
    fingerprint: str = ""  # sha256 prefix of the weights
    notes: list[str] = field(default_factory=list)

    @torch.no_grad()
    def features(self, images: Iterable[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """``[N, D]`` float64 features of uint8 ``[H, W, 3]`` images (each resized by the network)."""
        out = [self._forward_batch(batch).double().numpy() for batch in _batches(images, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, getattr(self.module, "dims", 0)))

    def _forward_batch(self, batch: list[np.ndarray]) -> torch.Tensor:
        shapes = {img.shape for img in batch}
        if len(shapes) == 1:  # one forward for a batch of equal sizes
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255.0
            return self.module(x)
        return torch.cat([self.module(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
                                      / 255.0) for img in batch])


def _batches(images: Iterable[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for image in images:
        batch.append(image)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def feature_network(kind: str = "auto", inception_weights: str | Path | None = None) -> FeatureNetwork:
    """The network for ``kind`` (auto: Inception when its weights are found, else random-conv)."""
    if kind not in FEATURE_NETS:
        raise EvalError(f"unknown feature network {kind!r}; choose one of {', '.join(FEATURE_NETS)}")
    if kind == "random-conv" and inception_weights:
        raise EvalError("--inception-weights was given with --feature-net random-conv; drop one of them")
    path, where = (None, "") if kind == "random-conv" else find_inception_weights(inception_weights)
    if path is None and kind == "inception":
        raise EvalError(f"--feature-net inception: no Inception weights found ({where}); get pytorch-fid's "
                        f"{INCEPTION_FILE_NAMES[0]} and pass --inception-weights PATH")
    if path is not None:
        model = load_inception(path)
        sha = _sha256(path)
        notes = [] if sha.startswith(INCEPTION_SHA256_PREFIX) else [
            f"the weights' sha256 starts with {sha[:8]}, not {INCEPTION_SHA256_PREFIX} (the official file's name): "
            "they may not be the standard FID weights, and the values not comparable with published FIDs"]
        return FeatureNetwork(
            name="inception",
            description=f"FID Inception-v3 (pytorch-fid layout, 2048-d pool features, 299x299 bilinear) with "
                        f"weights {path} (from {where}); aims at values comparable with pytorch-fid",
            comparable_with_published=not notes, module=model, weights=str(path), fingerprint=sha[:12], notes=notes)
    module = RandomConvFeatures(seed=0)
    return FeatureNetwork(
        name="random-conv",
        description=f"random-conv v1 (seed 0, weights sha256 {module.fingerprint()}): fixed random-weight conv net, "
                    "64x64 input, 480-d pooled features; offline default, NOT comparable with published "
                    "(Inception) FIDs, only with runs of this same network",
        comparable_with_published=False, module=module, fingerprint=module.fingerprint(),
        notes=[] if kind == "random-conv" else [f"no Inception weights found ({where})"])


@dataclass
class FidReport:
    fid: float
    samples: str
    reference: str
    sample_count: int
    reference_count: int
    feature_network: str
    feature_network_description: str
    comparable_with_published: bool
    feature_dims: int
    weights: str | None
    weights_fingerprint: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_text(self) -> str:
        lines = [
            f"FID {self.fid:.4f}",
            f"samples:   {self.samples} ({self.sample_count} images)",
            f"reference: {self.reference} ({self.reference_count} images)",
            f"feature network: {self.feature_network_description}",
        ]
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _folder_images(files: Sequence[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield read_image(path)


def _digits_reference(size: tuple[int, ...]) -> list[np.ndarray]:
    from dfmkit.eval.digits import _load_digits, render_digits

    images, _ = _load_digits()
    if size[0] != size[1]:
        raise EvalError(f"--reference {SKLEARN_DIGITS} renders square digits; the samples are {size[0]}x{size[1]}")
    return list(render_digits(images, size[0]))


def compute_fid(
    samples: str | Path,
    reference: str | Path,
    *,
    inception_weights: str | Path | None = None,
    feature_net: str = "auto",
    batch_size: int = 32,
) -> FidReport:
    """FID between the images in ``samples`` and those in ``reference`` (a folder, or ``"sklearn:digits"``)."""
    if batch_size < 1:
        raise EvalError(f"--batch-size must be at least 1, got {batch_size}")
    sample_files = list_images(samples, role="samples")
    if str(reference) == SKLEARN_DIGITS:
        rendered = _digits_reference(read_image(sample_files[0]).shape[:2])
        reference_images: Iterable[np.ndarray] = rendered
        reference_count = len(rendered)
    else:
        reference_files = list_images(reference, role="reference")
        reference_images, reference_count = _folder_images(reference_files), len(reference_files)
    for role, count in (("samples", len(sample_files)), ("reference", reference_count)):
        if count < 2:
            raise EvalError(f"FID needs at least 2 images per set; the {role} folder has {count}")
    network = feature_network(feature_net, inception_weights)
    features_a = network.features(_folder_images(sample_files), batch_size)
    features_b = network.features(reference_images, batch_size)
    fid = fid_from_features(features_a, features_b)
    dims = features_a.shape[1]
    warnings = list(network.notes)
    fewest = min(len(features_a), len(features_b))
    if fewest <= dims:
        warnings.append(f"{fewest} images for {dims}-d features: the covariance is rank-deficient; FID is biased "
                        "upward at small counts, so compare values only at equal sample counts")
    return FidReport(
        fid=fid, samples=str(samples), reference=str(reference), sample_count=len(features_a),
        reference_count=len(features_b), feature_network=network.name,
        feature_network_description=network.description, comparable_with_published=network.comparable_with_published,
        feature_dims=dims, weights=network.weights, weights_fingerprint=network.fingerprint, warnings=warnings,
    )
