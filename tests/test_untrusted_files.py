"""Files a user may download run no code when dfmkit reads them: a checkpoint (its loader state, its ``.distcp``
byte entries, ``common.pt``, ``.metadata``) and a dataset folder (``.nv-meta/dataset.yaml``).

Each payload would create a marker file if it ran; each test checks that the marker never appears and that the
error names the file. One module-level run trains the tiny DiT for two steps on a tiny Energon dataset (so the
checkpoint holds a real Energon loader state); each test tampers with a copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_train import tiny_recipe

import dfmkit
from dfmkit.data import DataError
from dfmkit.data.loader import build_train_loader, build_validation_batches, state_from_json
from dfmkit.data.prepare import index_dataset
from dfmkit.data.shards import DATASET_INFO, ShardWriter
from dfmkit.errors import CheckpointError
from dfmkit.generation import load
from dfmkit.train.loop import Trainer


class System:
    """Pickles as ``os.system(command)``: unpickling it runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def ran(marker: Path) -> bool:
    time.sleep(0.3)  # a Popen payload runs its command asynchronously
    return marker.exists()


def energon_recipe(root: Path, dataset: Path, **data) -> dict:
    return tiny_recipe(root / "ck", data={"mock": False, "path": str(dataset), "num_workers": 0, **data},
                       train={"train_iters": 2}, optim={"warmup_iters": 1}, checkpoint={"save_interval": 2})


def write_dataset(root: Path) -> Path:
    root.mkdir(parents=True)
    with ShardWriter(root, "train", max_samples=8) as writer:
        for k in range(16):
            generator = torch.Generator().manual_seed(k)
            writer.write(f"{k:09d}", torch.randn(3, 1, 8, 8, generator=generator),
                         torch.randn(2 + k % 3, 64, generator=generator), {"caption": f"sample {k}"})
    (root / DATASET_INFO).write_text(json.dumps({"latent_channels": 3, "text_dim": 64}))
    index_dataset(root)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work folder, dataset, the folder of the saved checkpoint) of two steps on a tiny Energon dataset."""
    root = tmp_path_factory.mktemp("untrusted")
    dataset = write_dataset(root / "dataset")
    assert Trainer(dfmkit.build(energon_recipe(root, dataset))).train()["step"] == 2
    return root, dataset, root / "ck" / "iter_0000002"


@pytest.fixture
def copy(trained, tmp_path):
    """A copy of the trained checkpoint and dataset to tamper with: (recipe resuming from it, checkpoint folder)."""
    root, dataset, found = trained
    shutil.copytree(root / "ck", tmp_path / "ck")
    return energon_recipe(tmp_path, dataset), tmp_path / "ck" / found.name


# --------------------------------------------------------------------------------------------
# Checkpoint: rank_*.json (the loader state)
# --------------------------------------------------------------------------------------------


def test_loader_state_naming_an_attribute_chain_is_refused(copy, tmp_path):
    recipe, found = copy
    marker = tmp_path / "ran"
    rank_file = found / "rank_00000.json"
    state = json.loads(rank_file.read_text())
    assert state["loader"]["kind"] == "energon"
    # Popen(dict) runs list(dict), the keys: ["touch", marker].
    state["loader"]["energon"] = {"$mapping": "dfmkit.data.loader:np.f2py.subprocess.Popen",
                                  "items": [["touch", None], [str(marker), None]]}
    rank_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=str(rank_file)):
        Trainer(dfmkit.build(recipe))
    assert not ran(marker)


@pytest.mark.parametrize("entry", [
    {"$mapping": "megatron.energon.state:np.f2py.subprocess.Popen", "items": []},
    {"$dataclass": "dfmkit.data.loader:dataclasses.sys.modules", "fields": {}},
    {"$dataclass": "megatron.energon.savable_loader:SavableDataLoaderState", "fields": {"__class__": 1}},
    {"$tensor": {"dtype": "load", "shape": [0], "data": ""}},
])
def test_loader_state_holds_only_the_energon_state_classes(entry):
    with pytest.raises(DataError):
        state_from_json(entry)


# --------------------------------------------------------------------------------------------
# Checkpoint: megatron's files (.distcp byte entries, common.pt) and torch's .metadata
# --------------------------------------------------------------------------------------------


def _replace_bytes_entry(found: Path, payload: bytes) -> Path:
    """Point the first ``_extra_state`` byte entry of the checkpoint at ``payload``, appended to its .distcp file
    (as a tampered checkpoint would hold it); returns that file."""
    from dfmkit.compat.torch_dcp import MetadataUnpickler

    with open(found / ".metadata", "rb") as stream:
        metadata = MetadataUnpickler(stream).load()
    index = next(i for i in metadata.storage_data if i.fqn.endswith("_extra_state/shard_0_2"))
    info = metadata.storage_data[index]
    distcp = found / info.relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    (found / ".metadata").write_bytes(pickle.dumps(metadata))
    return distcp


def _torch_saved(value) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def test_a_pickle_in_a_distcp_byte_entry_is_refused_on_resume(copy, tmp_path):
    recipe, found = copy
    marker = tmp_path / "ran"
    distcp = _replace_bytes_entry(found, _torch_saved([System(f"touch {marker}")]))
    with pytest.raises(CheckpointError, match=str(distcp)):
        Trainer(dfmkit.build(recipe))
    assert not ran(marker)


def test_extra_state_that_transformer_engine_would_unpickle_is_refused(copy, tmp_path):
    """A pickle inside a byte tensor passes the weights-only reader; TransformerEngine's modules (the ``te``
    attention backend) would ``pickle.loads`` it when the state is loaded into the model. (On this CPU build the
    entry belongs to megatron's linears, which ignore extra state.)"""
    recipe, found = copy
    marker = tmp_path / "ran"
    pickled = torch.frombuffer(bytearray(pickle.dumps(System(f"touch {marker}"))), dtype=torch.uint8)
    _replace_bytes_entry(found, _torch_saved([pickled]))
    with pytest.raises(CheckpointError, match=rf"{found} holds extra state for .*_extra_state \(Tensor\)"):
        Trainer(dfmkit.build(recipe))
    assert not ran(marker)


def test_generation_reads_no_byte_entry(copy, tmp_path):
    """Generation and export read only the weights (tensors) of a checkpoint: a tampered byte entry is never
    unpickled there."""
    _, found = copy
    marker = tmp_path / "ran"
    _replace_bytes_entry(found, _torch_saved([System(f"touch {marker}")]))
    load(found, device="cpu", keep_text_encoder=False)
    assert not ran(marker)


@pytest.mark.parametrize("reader", ["resume", "generate"])
def test_a_pickle_in_common_pt_is_refused(copy, tmp_path, reader):
    recipe, found = copy
    marker = tmp_path / "ran"
    torch.save({"trainer": System(f"touch {marker}")}, found / "common.pt")
    with pytest.raises(CheckpointError, match=str(found / "common.pt")):
        Trainer(dfmkit.build(recipe)) if reader == "resume" else load(found, device="cpu", keep_text_encoder=False)
    assert not ran(marker)


@pytest.mark.parametrize("reader", ["resume", "generate"])
def test_a_pickle_in_the_dcp_metadata_is_refused(copy, tmp_path, reader):
    recipe, found = copy
    marker = tmp_path / "ran"
    (found / ".metadata").write_bytes(pickle.dumps(System(f"touch {marker}")))
    with pytest.raises(CheckpointError, match=rf"{found / '.metadata'} refers to (posix|os)\.system"):
        Trainer(dfmkit.build(recipe)) if reader == "resume" else load(found, device="cpu", keep_text_encoder=False)
    assert not ran(marker)


def test_the_untampered_checkpoint_loads(copy):
    recipe, found = copy
    assert Trainer(dfmkit.build(recipe)).state.step == 2
    load(found, device="cpu", keep_text_encoder=False)


# --------------------------------------------------------------------------------------------
# Dataset: .nv-meta/dataset.yaml
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tampered_dataset(trained, tmp_path):
    """A copy of the dataset whose dataset.yaml builds ``subprocess.Popen(["touch", marker])``: (folder, marker)."""
    _, dataset, _ = trained
    copied = shutil.copytree(dataset, tmp_path / "dataset")
    marker = tmp_path / "ran"
    (copied / ".nv-meta" / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
        f"subflavors:\n  x:\n    __module__: subprocess\n    __class__: Popen\n    args: [touch, {marker}]\n")
    return copied, marker


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_yaml_that_builds_objects_is_refused_by_the_training_loader(tampered_dataset, tmp_path, workers):
    dataset, marker = tampered_dataset
    recipe = dfmkit.build(energon_recipe(tmp_path, dataset, num_workers=workers)).recipe
    with pytest.raises(DataError, match=f"{dataset / '.nv-meta' / 'dataset.yaml'}.*dfmkit prepare"):
        build_train_loader(recipe)
    assert not ran(marker)


def test_dataset_yaml_that_builds_objects_is_refused_by_validation(tampered_dataset, tmp_path):
    dataset, marker = tampered_dataset
    recipe = dfmkit.build(energon_recipe(tmp_path, dataset)).recipe
    with pytest.raises(DataError, match=str(dataset / ".nv-meta" / "dataset.yaml")):
        build_validation_batches(recipe)
    assert not ran(marker)
    index_dataset(dataset)  # the fix the message names: it writes the plain declaration, reading none
    assert build_validation_batches(recipe, count=1) and not ran(marker)


@pytest.mark.parametrize("text", [
    "__module__: megatron.energon\n__class__: CrudeWebdataset\nsample_loader: sample_loader.py:sample_loader\n",
    "__module__: megatron.energon\n__class__: CaptioningWebdataset\n",
    "__module__: subprocess\n__class__: Popen\nargs: [true]\n",
    "!!python/object/apply:os.system [true]\n",
    "[unclosed\n",
    "__module__: megatron.energon\n__class__: CrudeWebdataset\n---\n__module__: subprocess\n",
    b"\xff\xfe",
], ids=["sample_loader", "other-class", "popen", "python-tag", "unparsable", "two-documents", "not-utf8"])
def test_only_the_declaration_dfmkit_prepare_writes_is_accepted(trained, tmp_path, text):
    _, dataset, _ = trained
    copied = shutil.copytree(dataset, tmp_path / "dataset")
    (copied / ".nv-meta" / "dataset.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    recipe = dfmkit.build(energon_recipe(tmp_path, copied)).recipe
    with pytest.raises(DataError, match=str(copied / ".nv-meta" / "dataset.yaml")):
        build_train_loader(recipe)


def test_a_metadataset_yaml_is_refused(tmp_path):
    """Energon would build a metadataset from a YAML file; dfmkit trains on a prepared folder only."""
    marker = tmp_path / "ran"
    meta = tmp_path / "meta.yaml"
    meta.write_text(f"__module__: subprocess\n__class__: Popen\nargs: [touch, {marker}]\n")
    recipe = dfmkit.build(energon_recipe(tmp_path, meta)).recipe
    with pytest.raises(DataError, match=f"{meta}.*is a file"):
        build_train_loader(recipe)
    assert not ran(marker)
