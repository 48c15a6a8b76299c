"""dfmkit eval: digit prompt adherence and FID, on real digits rendered to folders (no generator needed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from dfmkit.errors import DfmkitError
from dfmkit.eval import EvalError
from dfmkit.eval.cli import add_eval_arguments
from dfmkit.eval.digits import (
    _load_digits,
    digit_classifier,
    evaluate_digits,
    prompt_digit,
    render_digits,
)
from dfmkit.eval.fid import (
    INCEPTION_ENV,
    INCEPTION_FILE_NAMES,
    INCEPTION_PARAMETERS,
    FIDInceptionV3,
    compute_fid,
    feature_network,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_inception,
)


def run_eval(argv: list[str], capsys) -> tuple[int, str, str]:
    """``dfmkit eval ...`` through a parser wired as dfmkit/cli.py wires it, with main()'s error handling."""
    parser = argparse.ArgumentParser(prog="dfmkit")
    add_eval_arguments(parser.add_subparsers(dest="command").add_parser("eval"))
    args = parser.parse_args(["eval", *argv])
    try:
        code = args.func(args)
    except DfmkitError as exc:
        print(f"error: {exc}")
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def no_inception_weights(monkeypatch, tmp_path):
    """Tests see no Inception weights unless they put some there (a developer's hub cache is hidden)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)


def digit_prompts(labels) -> list[str]:
    return [f"a handwritten digit {int(k)}" for k in labels]


def heldout_digits() -> tuple[np.ndarray, np.ndarray]:
    """The held-out real digits ``[N, 8, 8]`` (0..16) and their labels, never seen by the classifier."""
    images, labels = _load_digits()
    indices = digit_classifier().heldout_indices
    return images[indices], labels[indices]


def write_samples(folder: Path, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[Path]:
    """Images as ``NNN.png`` with a sidecar ``NNN.json`` ``{"prompt", "index", "file"}``, like ``dfmkit generate``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
        path = folder / f"{index:03d}.png"
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path)
        path.with_suffix(".json").write_text(json.dumps({"prompt": prompt, "index": index, "file": path.name}))
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_prompt_parse_is_strict():
    assert prompt_digit("a handwritten digit 7") == 7
    for prompt in ("a handwritten digit 10", "A handwritten digit 7", "a handwritten digit 7 ", "a handwritten digit",
                   "a handwritten digit seven", " a handwritten digit 7"):
        assert prompt_digit(prompt) is None


def test_classifier_is_sane_on_real_digits():
    summary = digit_classifier().summary()
    assert summary["heldout_count"] == 360 and summary["train_count"] == 1437
    assert summary["heldout_accuracy"] > 0.97
    assert summary["heldout_accuracy_rendered_32px"] > 0.97


@pytest.mark.parametrize("size,grey", [(32, False), (24, True), (64, True)])
def test_real_digits_with_their_prompts_score_high(tmp_path, size, grey):
    images, labels = heldout_digits()
    write_samples(tmp_path, render_digits(images, size, grey=grey), digit_prompts(labels))
    report = evaluate_digits(tmp_path)
    assert report.count == 360 and report.image_sizes == [f"{size}x{size}"]
    assert report.accuracy > 0.95
    assert sorted(report.per_digit) == list(range(10))
    assert all(row["accuracy"] > 0.85 for row in report.per_digit.values())
    assert np.trace(report.confusion) == report.correct and np.sum(report.confusion) == 360


def test_blank_images_count_as_wrong_and_are_listed(tmp_path, capsys):
    """A black image reads as a "1" to the classifier; no blank or near-constant image may count as right."""
    images, labels = heldout_digits()
    real = render_digits(images[:20], 32)
    near_constant = np.clip(128 + np.random.default_rng(0).normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
    blanks = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 255, np.uint8), near_constant]
    assert digit_classifier().predict(np.zeros((1, 8, 8)))[0] == 1  # why the rule is needed
    write_samples(tmp_path / "real", real, digit_prompts(labels[:20]))
    write_samples(tmp_path / "all", [*real, *blanks], digit_prompts(labels[:20]) + digit_prompts([1, 1, 9]))
    only_real, report = evaluate_digits(tmp_path / "real"), evaluate_digits(tmp_path / "all")
    assert only_real.blank == [] and only_real.correct >= 19
    assert report.blank == ["020.png", "021.png", "022.png"]
    assert report.count == 23 and report.correct == only_real.correct
    assert report.accuracy == pytest.approx(only_real.correct / 23)
    assert report.per_digit[1]["blank"] == 2 and report.per_digit[9]["blank"] == 1
    assert [r["read_as"] for r in report.readings[20:]] == [None, None, None]
    assert "3 blank sample(s)" in report.format_text()
    json.dumps(report.to_dict())


def test_shuffled_prompts_score_at_chance(tmp_path):
    images, labels = heldout_digits()
    shuffled = np.random.default_rng(0).permutation(labels)
    write_samples(tmp_path, render_digits(images, 16), digit_prompts(shuffled))
    report = evaluate_digits(tmp_path)
    assert report.accuracy < 0.2  # chance is 0.1
    shifted = tmp_path / "shifted"
    write_samples(shifted, render_digits(images, 16), digit_prompts((labels + 1) % 10))
    assert evaluate_digits(shifted).accuracy < 0.05


def test_digits_cli_text_and_json(tmp_path, capsys):
    images, labels = heldout_digits()
    write_samples(tmp_path, render_digits(images[:40], 32), digit_prompts(labels[:40]))
    code, out, _ = run_eval(["digits", "--samples", str(tmp_path)], capsys)
    assert code == 0
    assert "held-out accuracy" in out and "area averaging" in out and "overall" in out
    code, out, _ = run_eval(["digits", "--samples", str(tmp_path), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["count"] == 40 and data["accuracy"] > 0.9
    assert set(data["per_digit"]) <= {str(k) for k in range(10)} and len(data["confusion"]) == 10
    assert data["classifier"]["heldout_accuracy"] > 0.97


def test_digits_grid_puts_each_digit_in_its_column_and_frames_misreadings(tmp_path, capsys):
    from PIL import Image

    images, labels = heldout_digits()
    order = np.argsort(labels, kind="stable")
    pick = np.concatenate([order[labels[order] == d][:2] for d in range(10)])  # two of each digit
    prompts = digit_prompts(labels[pick])
    prompts[0] = "a handwritten digit 7"  # a real 0 asked for as a 7: misread, framed red in column 7
    samples = tmp_path / "samples"
    write_samples(samples, render_digits(images[pick], 16), prompts)
    code, _, _ = run_eval(["digits", "--samples", str(samples), "--grid", str(tmp_path / "grid.png")], capsys)
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    assert code == 0 and grid.shape == (3 * 52 + 4, 10 * 52 + 4, 3)  # column 7 holds three samples
    red = (grid[..., 0] > 150) & (grid[..., 1] < 80)
    frame_of = lambda col, row: red[row * 52 + 2 : row * 52 + 54, col * 52 + 2 : col * 52 + 54].any()  # noqa: E731
    assert frame_of(7, 0) and not frame_of(0, 0) and not frame_of(7, 1)
    assert not red[:, : 7 * 52].any()  # no other sample is framed


def test_other_prompts_fail_or_are_skipped(tmp_path, capsys):
    images, labels = heldout_digits()
    prompts = digit_prompts(labels[:6])
    prompts[2] = "a handwritten digit 12"
    write_samples(tmp_path, render_digits(images[:6], 32), prompts)
    with pytest.raises(EvalError, match=r"002\.json: prompt 'a handwritten digit 12' is not exactly"):
        evaluate_digits(tmp_path)
    report = evaluate_digits(tmp_path, skip_other_prompts=True)
    assert report.count == 5 and report.skipped == [{"file": "002.png", "prompt": "a handwritten digit 12"}]
    code, out, _ = run_eval(["digits", "--samples", str(tmp_path)], capsys)
    assert code == 2 and "--skip-other-prompts" in out


def test_digits_bad_input(tmp_path):
    with pytest.raises(EvalError, match="does not exist"):
        evaluate_digits(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="has no images"):
        evaluate_digits(tmp_path / "empty")
    folder = tmp_path / "s"
    images, labels = heldout_digits()
    write_samples(folder, render_digits(images[:3], 16), digit_prompts(labels[:3]))
    (folder / "001.json").unlink()
    with pytest.raises(EvalError, match=r"001\.png: no sidecar 001\.json"):
        evaluate_digits(folder)
    (folder / "001.json").write_text("{not json")
    with pytest.raises(EvalError, match=r"001\.json: not a readable JSON file"):
        evaluate_digits(folder)
    (folder / "001.json").write_text(json.dumps({"index": 1}))
    with pytest.raises(EvalError, match=r"001\.json: expected a JSON object with a string 'prompt'"):
        evaluate_digits(folder)
    (folder / "001.json").write_text(json.dumps({"prompt": "a handwritten digit 1"}))
    (folder / "000.png").write_bytes(b"not a png")
    with pytest.raises(EvalError, match=r"cannot read image .*000\.png"):
        evaluate_digits(folder)


def test_inverted_images_are_flagged(tmp_path):
    images, labels = heldout_digits()
    write_samples(tmp_path, 255 - render_digits(images[:20], 16), digit_prompts(labels[:20]))
    report = evaluate_digits(tmp_path)
    assert any("light strokes on a black background" in w for w in report.warnings)


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def test_frechet_distance_agrees_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    for n1, n2, dims in [(60, 80, 16), (9, 12, 40)]:  # full-rank, then rank-deficient covariances
        x1 = rng.normal(size=(n1, dims))
        x2 = rng.normal(size=(n2, dims)) * 1.3 + 0.2
        (mu1, s1), (mu2, s2) = feature_statistics(x1), feature_statistics(x2)
        reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(
            scipy_linalg.sqrtm(s1 @ s2)).real
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)
        assert fid_from_features(x1, x2) == pytest.approx(reference, rel=1e-6)
        assert fid_from_features(x2, x1) == pytest.approx(fid_from_features(x1, x2), rel=1e-9)
        assert fid_from_features(x1, x1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(np.zeros(1), np.ones((1, 1)), np.full(1, 3.0), np.full((1, 1), 4.0)) == pytest.approx(
        9 + 1 + 4 - 2 * 2)  # 1-d Gaussians: (mu1-mu2)^2 + (s1-s2)^2 with s = std


def test_fid_tracks_distribution_shift():
    images, labels = _load_digits()
    order = np.random.default_rng(0).permutation(len(labels))
    a = render_digits(images[order[:100]], 32)
    b = render_digits(images[order[100:200]], 32)
    network = feature_network("random-conv")
    fa, fb = network.features(a), network.features(b)
    brighter = network.features(np.clip(a.astype(np.int16) + 40, 0, 255).astype(np.uint8))
    noisy = network.features(np.clip(a + np.random.default_rng(1).normal(0, 30, a.shape), 0, 255).astype(np.uint8))
    same = fid_from_features(fa, fb)
    assert fid_from_features(fa, fa) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(fb, fa) == pytest.approx(same, rel=1e-6)
    assert fid_from_features(fa, brighter) > 100 * same
    assert fid_from_features(fa, noisy) > 5 * same
    # the network is fixed: the same weights on every run and installation
    assert network.features(a[:3]) == pytest.approx(feature_network("random-conv").features(a[:3]))


def test_fid_cli_on_folders(tmp_path, capsys, monkeypatch):
    images, labels = _load_digits()
    write_samples(tmp_path / "gen", render_digits(images[:30], 16), digit_prompts(labels[:30]))
    write_samples(tmp_path / "ref", render_digits(images[30:70], 16), digit_prompts(labels[30:70]))
    code, out, _ = run_eval(["fid", "--samples", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                             "--json", "--batch-size", "7"], capsys)
    data = json.loads(out)
    assert code == 0 and data["sample_count"] == 30 and data["reference_count"] == 40
    assert data["feature_network"] == "random-conv" and data["comparable_with_published"] is False
    assert data["feature_dims"] == 480 and data["fid"] >= 0
    assert any("no Inception weights found" in w for w in data["warnings"])
    code, out, _ = run_eval(["fid", "--samples", str(tmp_path / "gen"), "--reference", str(tmp_path / "gen")], capsys)
    assert code == 0 and "FID 0.0000" in out and "NOT comparable with published" in out
    subset = (images[100:150], labels[100:150])  # the whole set (1797) works too, but slowly for a unit test
    monkeypatch.setattr("dfmkit.eval.digits._load_digits", lambda: subset)
    report = compute_fid(tmp_path / "gen", "sklearn:digits")
    assert report.reference == "sklearn:digits" and report.reference_count == 50
    assert 0 < report.fid < 1.0


def test_fid_bad_input(tmp_path, capsys):
    images, labels = _load_digits()
    write_samples(tmp_path / "ok", render_digits(images[:4], 16), digit_prompts(labels[:4]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="reference folder .*empty.* has no images"):
        compute_fid(tmp_path / "ok", tmp_path / "empty")
    with pytest.raises(EvalError, match="samples folder .*nowhere.* does not exist"):
        compute_fid(tmp_path / "nowhere", tmp_path / "ok")
    bad = tmp_path / "bad"
    write_samples(bad, render_digits(images[:4], 16), digit_prompts(labels[:4]))
    (bad / "003.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(EvalError, match=r"cannot read image .*003\.png"):
        compute_fid(tmp_path / "ok", bad)
    one = tmp_path / "one"
    write_samples(one, render_digits(images[:1], 16), digit_prompts(labels[:1]))
    with pytest.raises(EvalError, match="at least 2 images"):
        compute_fid(one, tmp_path / "ok")
    code, out, _ = run_eval(["fid", "--samples", str(tmp_path / "ok"), "--reference", str(tmp_path / "ok"),
                             "--inception-weights", str(tmp_path / "missing.pth")], capsys)
    assert code == 2 and "missing.pth" in out and "no such file" in out
    with pytest.raises(EvalError, match="no Inception weights found"):
        compute_fid(tmp_path / "ok", tmp_path / "ok", feature_net="inception")


# --------------------------------------------------------------------------------------------
# the FID Inception: architecture and weight loading (random weights; the official file is not here)
# --------------------------------------------------------------------------------------------


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the key layout of pytorch-fid's weights file, random values, no num_batches_tracked."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with torch.device("meta"):
        model = FIDInceptionV3()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif value.ndim == 4:  # conv weights, He scale so activations keep their size
            state[key] = torch.randn(value.shape, generator=generator) * (2.0 / value[0].numel()) ** 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * 0.1 + (1.0 if key.endswith("bn.weight") else 0)
    return state


def test_inception_architecture_matches_the_fid_layout():
    with torch.device("meta"):
        model = FIDInceptionV3()
    # torchvision publishes 27,161,264 parameters for inception_v3 (1000 classes, aux head); without the aux
    # head (3,326,696) and with the FID graph's 1008-way classifier (+16,392) that is 23,850,960.
    assert sum(p.numel() for p in model.parameters()) == INCEPTION_PARAMETERS == 23_850_960
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == 566 and sum(k.endswith("num_batches_tracked") for k in shapes) == 94
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_4a_3x3.bn.running_var"] == (192,)
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert shapes["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
    assert shapes["fc.weight"] == (1008, 2048)
    assert not any("AuxLogits" in k for k in shapes)


@pytest.fixture(scope="module")
def inception_state() -> dict[str, torch.Tensor]:
    return random_inception_state()


def test_inception_weights_load_and_run(tmp_path, monkeypatch, inception_state):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(inception_state, hub / INCEPTION_FILE_NAMES[0])
    loaded = load_inception(hub / INCEPTION_FILE_NAMES[0]).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in inception_state.items())
    images, labels = _load_digits()
    write_samples(tmp_path / "a", render_digits(images[:2], 16), digit_prompts(labels[:2]))
    write_samples(tmp_path / "b", render_digits(images[2:4], 16), digit_prompts(labels[2:4]))
    report = compute_fid(tmp_path / "a", tmp_path / "b")  # auto: found in torch hub's cache
    assert report.feature_network == "inception" and report.feature_dims == 2048
    assert report.weights == str(hub / INCEPTION_FILE_NAMES[0]) and np.isfinite(report.fid) and report.fid > 0
    assert report.comparable_with_published is False  # random weights: their sha256 is not the official one
    assert any("may not be the standard FID weights" in w for w in report.warnings)
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(EvalError, match=r"\$DFMKIT_INCEPTION_WEIGHTS='.*nope\.pth': no such file"):
        feature_network("auto")


def test_inception_weights_that_do_not_fit(tmp_path, inception_state):
    state = dict(inception_state)
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    state["fc.weight"] = torch.zeros(1000, 2048)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(EvalError) as info:
        load_inception(tmp_path / "w.pth")
    message = str(info.value)
    assert "1 missing key(s): Mixed_6c.branch7x7_2.conv.weight" in message
    assert "1 unexpected key(s): AuxLogits.fc.weight" in message
    assert "fc.weight (1000, 2048) != (1008, 2048)" in message
    (tmp_path / "garbage.pth").write_bytes(b"definitely not a torch file")
    with pytest.raises(EvalError, match="cannot load Inception weights .*garbage.pth"):
        load_inception(tmp_path / "garbage.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(EvalError, match="expected a state dict"):
        load_inception(tmp_path / "list.pth")
