"""Checkpoints: an exact round trip (LoRA and full), sha256 verification, safetensors only, atomic publish."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import model_cfg, reteq_cache  # noqa: F401  (session fixture)

from reteq.models import load_model
from reteq.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    checkpoint_manifest,
    is_complete,
    save_checkpoint,
    verify_checkpoint,
)

pytestmark = pytest.mark.usefixtures("reteq_cache")

LORA = {"r": 4, "alpha": 8}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _logits(model) -> torch.Tensor:
    ids = torch.tensor([[0, 4, 17, 99, 250, 3, 512, 7, 1000, 42]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _trained(lora: dict | None, seed: int = 0):
    """The tiny model with every trainable weight moved (LoRA's B starts at zero, so an untouched adapter
    would round-trip trivially)."""
    model = load_model(model_cfg(lora), seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_round_trip_reproduces_logits_exactly(tmp_path, lora):
    model = _trained(lora)
    expected = _logits(model)
    assert not torch.equal(expected, _logits(load_model(model_cfg(lora), seed=0)))  # training changed them
    path = save_checkpoint(model, tmp_path / "node", key="k1", meta={"stage": "U"})
    assert path == tmp_path / "node"
    manifest = verify_checkpoint(path, key="k1")
    assert manifest["meta"] == {"stage": "U"}
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {MANIFEST}
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert weights in manifest["files"]
    restored = load_model(model_cfg(lora), checkpoint=path, trainable=False)
    assert torch.equal(_logits(restored), expected)
    if lora:  # the adapter alone is saved, and it restores trainable for the next stage
        assert sum(p.numel() for p in load_model(model_cfg(lora), checkpoint=path).parameters()
                   if p.requires_grad) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_no_pickle_is_published(tmp_path, lora):
    path = save_checkpoint(_trained(lora), tmp_path / "node", key="k")
    for f in path.iterdir():
        assert f.suffix not in PICKLE_SUFFIXES, f.name
        head = f.read_bytes()[:4]
        assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), f.name  # pickle
        assert head != b"PK\x03\x04", f.name  # torch.save's zip container
    assert {f.suffix for f in path.iterdir()} <= {".safetensors", ".json", ".md"}  # peft writes a README.md card


def _flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora", "full"])
def test_a_flipped_byte_fails_verification(tmp_path, lora):
    path = save_checkpoint(_trained(lora), tmp_path / "node", key="k")
    weights = path / ("adapter_model.safetensors" if lora else "model.safetensors")
    _flip_byte(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{weights.name} is missing or corrupt"):
        verify_checkpoint(path)
    assert not is_complete(path, "k")
    with pytest.raises(CheckpointError):
        load_model(model_cfg(lora), checkpoint=path)


def test_missing_files_wrong_key_and_no_manifest_fail(tmp_path):
    path = save_checkpoint(_trained(LORA), tmp_path / "node", key="k")
    assert is_complete(path, "k") and not is_complete(path, "other")
    with pytest.raises(CheckpointError, match="manifest key k != expected other"):
        verify_checkpoint(path, key="other")
    (path / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        verify_checkpoint(path)
    (path / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint_manifest(path)
    assert not is_complete(tmp_path / "never-written")


class _FailsAfterWriting:
    """A real model whose save dies half way (disk full, preemption): the files are on disk, then an error."""

    def __init__(self, model, pickle_too: bool = False):
        self.model, self.pickle_too = model, pickle_too

    def save_pretrained(self, folder, **kwargs):
        self.model.save_pretrained(folder, **kwargs)
        if self.pickle_too:  # a library that also drops a pickle next to the safetensors
            torch.save(self.model.state_dict(), f"{folder}/pytorch_model.bin")
            return
        raise OSError("No space left on device")


@pytest.mark.parametrize("pickle_too", [False, True], ids=["crash", "pickle"])
def test_a_failed_save_leaves_nothing_behind(tmp_path, pickle_too):
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError if pickle_too else OSError):
        save_checkpoint(_FailsAfterWriting(_trained(None), pickle_too), root / "node", key="k")
    assert list(root.iterdir()) == []  # neither the target nor a temporary sibling


def test_a_node_already_published_is_kept(tmp_path):
    first = save_checkpoint(_trained(LORA, seed=1), tmp_path / "node", key="k")
    before = json.loads((first / MANIFEST).read_text())
    save_checkpoint(_trained(LORA, seed=2), tmp_path / "node", key="k")
    assert json.loads((first / MANIFEST).read_text()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["node"]
    verify_checkpoint(first, "k")
