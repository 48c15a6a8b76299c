"""Tokenizers: identity (pixels as latents) and cosmos (TorchScript release files, stood in for by tiny modules)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import pytest
import torch
from torch import Tensor, nn

from dfmkit.components.tokenizers.base import MissingArtifactError, Tokenizer, TokenizerInputError
from dfmkit.components.tokenizers.cosmos import (
    KNOWN_VARIANTS,
    CosmosOptions,
    CosmosTokenizer,
    parse_variant,
)
from dfmkit.components.tokenizers.identity import IdentityOptions, IdentityTokenizer
from dfmkit.errors import DfmkitError
from dfmkit.plugins import PluginManager

# ------------------------------------------------------------------------------------------
# Stand-ins for the official encoder.jit / decoder.jit: the same call interface, tiny maths.
# Video: [B,3,T,H,W] -> (latent [B,16,1+(T-1)/tf,H/s,W/s], (aux, aux)); image: 4-D in and out.
# ------------------------------------------------------------------------------------------


class VideoEncoder(nn.Module):
    def __init__(self, tf: int, sf: int):
        super().__init__()
        self.tf, self.sf = tf, sf
        self.proj = nn.Conv3d(3, 16, 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if x.dim() != 5 or (x.shape[2] - 1) % self.tf != 0 or x.shape[3] % 16 != 0 or x.shape[4] % 16 != 0:
            raise RuntimeError("misaligned input")
        b, c, t, h, w = x.shape
        rest = x[:, :, 1:].reshape(b, c, (t - 1) // self.tf, self.tf, h, w).mean(3)  # causal: frame 0 alone
        z = torch.cat([x[:, :, :1], rest], 2)
        z = z.reshape(b, c, z.shape[2], h // self.sf, self.sf, w // self.sf, self.sf).mean((4, 6))
        aux = torch.zeros(1, dtype=x.dtype)
        return self.proj(z), (aux, aux)


class VideoDecoder(nn.Module):
    def __init__(self, tf: int, sf: int):
        super().__init__()
        self.tf, self.sf = tf, sf
        self.proj = nn.Conv3d(16, 3, 1)

    def forward(self, z: Tensor) -> Tensor:
        y = self.proj(z)
        y = torch.cat([y[:, :, :1], y[:, :, 1:].repeat_interleave(self.tf, dim=2)], 2)
        return torch.tanh(y.repeat_interleave(self.sf, dim=3).repeat_interleave(self.sf, dim=4))


class ImageEncoder(nn.Module):
    def __init__(self, sf: int):
        super().__init__()
        self.sf = sf
        self.proj = nn.Conv2d(3, 16, 1)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if x.dim() != 4:
            raise RuntimeError("image tokenizers take [B, 3, H, W]")
        b, c, h, w = x.shape
        aux = torch.zeros(1, dtype=x.dtype)
        return self.proj(x.reshape(b, c, h // self.sf, self.sf, w // self.sf, self.sf).mean((3, 5))), (aux, aux)


class ImageDecoder(nn.Module):
    def __init__(self, sf: int):
        super().__init__()
        self.sf = sf
        self.proj = nn.Conv2d(16, 3, 1)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 4:
            raise RuntimeError("image tokenizers take [B, 16, h, w]")
        return torch.tanh(self.proj(z).repeat_interleave(self.sf, dim=2).repeat_interleave(self.sf, dim=3))


def write_release(folder: Path, variant: str) -> Path:
    """A folder in the official layout (encoder.jit, decoder.jit) holding scripted stand-ins for ``variant``."""
    v = parse_variant(variant)
    torch.manual_seed(0)
    if v.video:
        enc, dec = VideoEncoder(v.temporal_factor, v.spatial_factor), VideoDecoder(v.temporal_factor, v.spatial_factor)
    else:
        enc, dec = ImageEncoder(v.spatial_factor), ImageDecoder(v.spatial_factor)
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(enc), str(folder / "encoder.jit"))
    torch.jit.save(torch.jit.script(dec), str(folder / "decoder.jit"))
    return folder


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cosmos")
    return {name: write_release(root / name, name) for name in KNOWN_VARIANTS}


def cosmos(releases, variant="Cosmos-0.1-Tokenizer-CV4x8x8", **options) -> CosmosTokenizer:
    return CosmosTokenizer(CosmosOptions(variant=variant, path=str(releases[variant]), device="cpu", **options))


def pixels(*shape, dtype=torch.float32) -> Tensor:
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)


# ------------------------------------------------------------------------------------------ identity


def test_identity_round_trips_exactly_and_scales():
    tok = IdentityTokenizer(scale=2.0)
    assert isinstance(tok, Tokenizer)
    x = pixels(2, 3, 3, 5, 7)
    z = tok.encode(x)
    assert z.shape == (2, *tok.latent_shape(3, 5, 7)) == (2, 3, 3, 5, 7)
    torch.testing.assert_close(z, 2.0 * x)
    torch.testing.assert_close(tok.decode(z), x)
    assert tok.decode(torch.full((1, 3, 1, 2, 2), 10.0)).max() == 1.0  # decode clamps to [-1, 1]
    assert tok.encode(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_identity_rejects_bad_input():
    tok = IdentityTokenizer()
    for bad in (torch.zeros(1, 3, 8, 8), torch.zeros(1, 4, 1, 8, 8), torch.zeros(1, 3, 1, 8, 8, dtype=torch.uint8)):
        with pytest.raises(TokenizerInputError, match=r"\[B, 3, T, H, W\]"):
            tok.encode(bad)
    with pytest.raises(TokenizerInputError):
        tok.decode(torch.zeros(1, 16, 1, 8, 8))
    with pytest.raises(TokenizerInputError):
        tok.latent_shape(0, 8, 8)


def test_builtins_register_both_tokenizers():
    registry = PluginManager(entry_points=False).registries.tokenizer
    assert {"identity", "cosmos"} <= set(registry.names())
    assert registry.get("identity").build(IdentityOptions(scale=0.5)).scale == 0.5
    tok = registry.get("cosmos").build(CosmosOptions(variant="CI16x16", device="cpu"))
    assert (tok.latent_channels, tok.spatial_factor, tok.temporal_factor) == (16, 16, 1)


# --------------------------------------------------------------------------------- cosmos shapes


@pytest.mark.parametrize(
    "variant, frames_hw, expected",
    [
        ("Cosmos-0.1-Tokenizer-CV4x8x8", (1, 512, 512), (16, 1, 64, 64)),
        ("Cosmos-0.1-Tokenizer-CV4x8x8", (9, 512, 512), (16, 3, 64, 64)),  # the official README example
        ("Cosmos-0.1-Tokenizer-CV4x8x8", (121, 704, 1280), (16, 31, 88, 160)),
        ("Cosmos-0.1-Tokenizer-CV8x8x8", (17, 256, 384), (16, 3, 32, 48)),
        ("Cosmos-0.1-Tokenizer-CV8x8x8", (1, 16, 16), (16, 1, 2, 2)),
        ("Cosmos-0.1-Tokenizer-CI8x8", (1, 512, 768), (16, 1, 64, 96)),
        ("Cosmos-0.1-Tokenizer-CI8x8", (6, 64, 64), (16, 6, 8, 8)),  # frame by frame
        ("Cosmos-0.1-Tokenizer-CI16x16", (1, 512, 512), (16, 1, 32, 32)),
        ("CV4x8x8", (5, 32, 32), (16, 2, 4, 4)),  # short names mean the 0.1 release
    ],
)
def test_latent_shape_of_every_variant(variant, frames_hw, expected):
    tok = CosmosTokenizer(CosmosOptions(variant=variant, device="cpu"))  # no files needed for shapes
    assert tok.latent_shape(*frames_hw) == expected


def test_variant_names():
    assert parse_variant("CV4x8x8").repo_id == "nvidia/Cosmos-0.1-Tokenizer-CV4x8x8"
    assert parse_variant("Cosmos-1.0-Tokenizer-CV8x8x8").temporal_factor == 8
    for bad, why in [("DV4x8x8", "discrete"), ("CV4x8", "factors"), ("CI8x16", "factors"), ("VAE", "unknown")]:
        with pytest.raises(ValueError, match=why):
            parse_variant(bad)
    with pytest.raises(ValueError, match="temporal_window"):
        CosmosOptions(temporal_window=16)  # windows are 1 + k * 4 frames for CV4x8x8
    CosmosOptions(variant="CV8x8x8", temporal_window=17)


def test_alignment_errors_name_the_rule_and_the_fix():
    tok = CosmosTokenizer(CosmosOptions(device="cpu"))
    with pytest.raises(TokenizerInputError, match=r"height 100 is not a multiple of 16.*96 or 112.*align = 'pad'"):
        tok.latent_shape(1, 100, 128)
    with pytest.raises(TokenizerInputError, match=r"width 4 is smaller than the spatial factor 8"):
        tok.latent_shape(1, 16, 4)
    with pytest.raises(TokenizerInputError, match=r"1 \+ a multiple of 4 frames.*6 frames.*use 5 or 9"):
        tok.latent_shape(6, 16, 16)
    with pytest.raises(TokenizerInputError, match="at least one frame"):
        tok.latent_shape(0, 16, 16)
    padded = CosmosTokenizer(CosmosOptions(device="cpu", align="pad"))
    assert padded.latent_shape(6, 100, 120) == (16, 3, 14, 16)  # 9 frames, 112 x 128 pixels
    with pytest.raises(TokenizerInputError, match="smaller than the spatial factor"):
        padded.latent_shape(1, 7, 16)  # padding never makes up for a side below the factor


def test_window_arithmetic():
    tok = CosmosTokenizer(CosmosOptions(device="cpu", temporal_window=17))
    assert tok.latent_shape(17, 16, 16)[1] == 5
    assert tok.latent_shape(34, 16, 16)[1] == 10  # two windows of 17, each 1 + 16/4
    assert tok.latent_shape(22, 16, 16)[1] == 7  # 17 + 5
    with pytest.raises(TokenizerInputError, match="last window of 4 frames.*use 18 or 22 frames"):
        tok.latent_shape(21, 16, 16)
    padded = CosmosTokenizer(CosmosOptions(device="cpu", temporal_window=17, align="pad"))
    assert padded.latent_shape(21, 16, 16)[1] == 7  # last window padded from 4 to 5 frames


# ------------------------------------------------------------------------------- cosmos files


def test_video_round_trip_shapes_and_dtypes(releases):
    tok = cosmos(releases)
    assert isinstance(tok, Tokenizer) and tok._modules == {}  # nothing loaded until used
    assert tok.identity.startswith("cosmos:Cosmos-0.1-Tokenizer-CV4x8x8:/") and "scale=0.5" in tok.identity
    x = pixels(2, 3, 9, 32, 48)
    z = tok.encode(x)
    assert set(tok._modules) == {"encoder"}  # prepare never loads the decoder
    assert z.shape == (2, 16, 3, 4, 6) and z.dtype == torch.float32
    raw = torch.jit.load(str(releases["Cosmos-0.1-Tokenizer-CV4x8x8"] / "encoder.jit"))(x)[0]
    torch.testing.assert_close(z, 0.5 * raw)  # latents are the official latent times scale
    y = tok.decode(z)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() <= 1
    zb = tok.encode(x.to(torch.bfloat16))
    assert zb.dtype == torch.bfloat16 and tok.decode(zb).dtype == torch.bfloat16
    torch.testing.assert_close(zb.float(), z, atol=0.05, rtol=0.05)


def test_bf16_networks_on_cpu(releases):
    tok = cosmos(releases, dtype="bf16")
    z = tok.encode(pixels(1, 3, 5, 16, 16))
    assert z.dtype == torch.float32 and z.shape == (1, 16, 2, 2, 2)
    assert next(tok._modules["encoder"].parameters()).dtype == torch.bfloat16


def test_image_variants_encode_frame_by_frame(releases):
    for variant, sf in [("Cosmos-0.1-Tokenizer-CI8x8", 8), ("Cosmos-0.1-Tokenizer-CI16x16", 16)]:
        tok = cosmos(releases, variant)
        x = pixels(2, 3, 3, 32, 64)
        z = tok.encode(x)
        assert z.shape == (2, 16, 3, 32 // sf, 64 // sf)
        one = tok.encode(x[:, :, 1:2])  # frames are independent images
        torch.testing.assert_close(z[:, :, 1:2], one)
        assert tok.decode(z).shape == x.shape


def test_temporal_windows_encode_chunks_independently(releases):
    whole = cosmos(releases)
    tok = cosmos(releases, temporal_window=9)
    x = pixels(1, 3, 23, 16, 16)  # windows of 9, 9 and 5 frames
    z = tok.encode(x)
    assert z.shape == (1, 16, 3 + 3 + 2, 2, 2) == (1, *tok.latent_shape(23, 16, 16))
    expected = torch.cat([whole.encode(x[:, :, s:e]) for s, e in [(0, 9), (9, 18), (18, 23)]], dim=2)
    torch.testing.assert_close(z, expected)
    y = tok.decode(z)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :, 9:18], whole.decode(z[:, :, 3:6]))


def test_pad_mode_pads_sides_and_frames(releases):
    tok = cosmos(releases, align="pad")
    z = tok.encode(pixels(1, 3, 7, 20, 30))  # -> 9 frames of 32 x 32
    assert z.shape == (1, 16, 3, 4, 4)
    assert tok.decode(z).shape == (1, 3, 9, 32, 32)  # decode describes the padded video


def test_bad_pixels_and_latents(releases):
    tok = cosmos(releases)
    with pytest.raises(TokenizerInputError, match=r"\[B, 3, T, H, W\]"):
        tok.encode(pixels(1, 3, 16, 16))
    with pytest.raises(TokenizerInputError, match="not a multiple of 16"):
        tok.encode(pixels(1, 3, 1, 24, 16))
    with pytest.raises(TokenizerInputError, match="1 \\+ a multiple of 4"):
        tok.encode(pixels(1, 3, 4, 16, 16))
    with pytest.raises(TokenizerInputError, match=r"\[B, 16, T, H, W\]"):
        tok.decode(torch.zeros(1, 8, 1, 2, 2))


def test_files_of_another_variant_are_caught(releases):
    tok = CosmosTokenizer(CosmosOptions(path=str(releases["Cosmos-0.1-Tokenizer-CV8x8x8"]), device="cpu"))
    with pytest.raises(DfmkitError, match="another variant"):
        tok.encode(pixels(1, 3, 9, 16, 16))  # an 8x temporal encoder gives 2 latent frames, CV4x8x8 needs 3


def test_missing_folder_names_files_and_hub_repo(tmp_path):
    with pytest.raises(MissingArtifactError) as info:
        CosmosTokenizer(CosmosOptions(path=str(tmp_path / "nope"), device="cpu"))
    message = str(info.value)
    assert "encoder.jit" in message and "decoder.jit" in message
    assert "nvidia/Cosmos-0.1-Tokenizer-CV4x8x8" in message and "hf download" in message
    (tmp_path / "half").mkdir()
    torch.jit.save(torch.jit.script(ImageEncoder(8)), str(tmp_path / "half" / "encoder.jit"))
    with pytest.raises(MissingArtifactError, match=r"decoder\.jit not found in .*half") as info:
        CosmosTokenizer(CosmosOptions(variant="CI8x8", path=str(tmp_path / "half"), device="cpu"))
    assert "nvidia/Cosmos-0.1-Tokenizer-CI8x8" in str(info.value)


def test_hub_download_and_offline_error(releases, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot(repo_id, allow_patterns, cache_dir):
        calls.append((repo_id, tuple(allow_patterns), cache_dir))
        return str(releases["Cosmos-0.1-Tokenizer-CV8x8x8"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    tok = CosmosTokenizer(CosmosOptions(variant="CV8x8x8", cache_dir=str(tmp_path), device="cpu"))
    assert tok.decode(tok.encode(pixels(1, 3, 9, 16, 16))).shape == (1, 3, 9, 16, 16)
    assert calls == [
        ("nvidia/Cosmos-0.1-Tokenizer-CV8x8x8", ("encoder.jit",), str(tmp_path)),
        ("nvidia/Cosmos-0.1-Tokenizer-CV8x8x8", ("decoder.jit",), str(tmp_path)),
    ]

    def offline(**_kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    tok = CosmosTokenizer(CosmosOptions(device="cpu"))
    with pytest.raises(MissingArtifactError) as info:
        tok.encode(pixels(1, 3, 1, 16, 16))
    message = str(info.value)
    assert "encoder.jit" in message and "nvidia/Cosmos-0.1-Tokenizer-CV4x8x8" in message and "offline" in message


def test_corrupt_file_is_reported(tmp_path):
    (tmp_path / "encoder.jit").write_bytes(b"not torchscript")
    (tmp_path / "decoder.jit").write_bytes(b"not torchscript")
    tok = CosmosTokenizer(CosmosOptions(path=str(tmp_path), device="cpu"))
    with pytest.raises(DfmkitError, match=r"cannot load .*encoder\.jit as TorchScript"):
        tok.encode(pixels(1, 3, 1, 16, 16))
