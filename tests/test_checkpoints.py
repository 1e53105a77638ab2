"""Checkpoint storage: manifest written last, local and S3 uploads, newest complete checkpoint."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from p2r.services.checkpoints import (
    MANIFEST,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    put_files,
    resolve_checkpoint,
    resolve_latest,
    upload_checkpoint,
    verify_checkpoint_dir,
    write_manifest,
)


def fake_checkpoint(path: Path, step: int) -> Path:
    """A directory with the files a Hugging Face checkpoint has (contents are step-specific)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"step": step}))
    (path / "model.safetensors").write_bytes(bytes([step % 256]) * 4096)
    (path / "tokenizer.json").write_text("{}")
    write_manifest(path, step=step)
    return path


def test_manifest_detects_tampering_and_missing_files(tmp_path: Path) -> None:
    ckpt = fake_checkpoint(tmp_path / "c", 3)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["step"] == 3 and set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert verify_checkpoint_dir(ckpt) == ckpt
    (ckpt / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing or does not match the manifest"):
        verify_checkpoint_dir(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        verify_checkpoint_dir(ckpt)


def test_local_uploads_and_resume_auto_skips_incomplete(tmp_path: Path) -> None:
    root = tmp_path / "run" / "stage1"
    assert latest_checkpoint(str(root)) is None
    for step in (10, 20):
        upload_checkpoint(fake_checkpoint(tmp_path / f"local-{step}", step), f"file://{root}/step-{step}")
    # An upload killed halfway: files copied, manifest never written.
    partial = fake_checkpoint(tmp_path / "local-30", 30)
    (root / "step-30").mkdir()
    shutil.copyfile(partial / "model.safetensors", root / "step-30" / "model.safetensors")
    assert [s for s, _ in complete_checkpoints(f"file://{root}")] == [10, 20]
    latest = latest_checkpoint(str(root))
    assert latest == str(root / "step-20")
    assert json.loads((resolve_checkpoint(latest, tmp_path) / "config.json").read_text()) == {"step": 20}
    with pytest.raises(CheckpointError, match="write the manifest"):
        (partial / MANIFEST).unlink()
        upload_checkpoint(partial, str(root / "step-31"))


def test_s3_uploads_and_resume_auto(tmp_path: Path, s3_server: dict[str, str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    root = "s3://p2r-run/exp1/stage1"
    assert latest_checkpoint(root) is None  # bucket does not exist yet
    for step in (5, 15):
        upload_checkpoint(fake_checkpoint(tmp_path / f"l{step}", step), f"{root}/step-{step}")
    from p2r.services.checkpoints import s3_client

    partial = fake_checkpoint(tmp_path / "l25", 25)
    s3_client().fput_object("p2r-run", "exp1/stage1/step-25/model.safetensors", str(partial / "model.safetensors"))
    assert complete_checkpoints(root) == [(5, f"{root}/step-5/"), (15, f"{root}/step-15/")]
    latest = latest_checkpoint(root)
    assert latest == f"{root}/step-15/"
    local = resolve_checkpoint(latest, tmp_path / "cache")
    assert json.loads((local / "config.json").read_text()) == {"step": 15}
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        resolve_checkpoint(f"{root}/step-25/", tmp_path / "cache")
    # An object replaced after the manifest was written is caught on download.
    s3_client().fput_object("p2r-run", "exp1/stage1/step-5/model.safetensors", str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match the manifest"):
        resolve_checkpoint(f"{root}/step-5/", tmp_path / "cache2")


def test_subdirectories_and_other_ranks_files_are_in_the_manifest(tmp_path: Path) -> None:
    """Training-state shards live in train_state/; shards another rank uploaded itself are
    listed by digest (``extra_files``) and verified once they are all in one place."""
    local = fake_checkpoint(tmp_path / "local", 1)
    (local / "train_state").mkdir()
    (local / "train_state" / "__0_0.distcp").write_bytes(b"rank0")
    other = {"train_state/__1_0.distcp": hashlib.sha256(b"rank1").hexdigest()}
    write_manifest(local, extra_files=other, step=1)
    files = json.loads((local / MANIFEST).read_text())["files"]
    assert {"train_state/__0_0.distcp", "train_state/__1_0.distcp", "model.safetensors"} <= set(files)
    with pytest.raises(CheckpointError, match=r"train_state/__1_0\.distcp is missing"):
        verify_checkpoint_dir(local)  # rank 1's shard has not arrived
    target = tmp_path / "root" / "step-1"
    put_files(local, ["train_state/__0_0.distcp"], str(target))
    (target / "train_state" / "__1_0.distcp").write_bytes(b"rank1")  # what rank 1 uploads
    put_files(local, [n for n in files if n not in other] + [MANIFEST], str(target))  # what rank 0 uploads
    assert verify_checkpoint_dir(target) == target


def test_latest_names_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "stage1"
    fake_checkpoint(root / "step-2", 2)
    fake_checkpoint(root / "step-4", 4)
    (root / "step-9").mkdir()  # torn: no manifest
    assert resolve_latest(f"latest:{root}") == str(root / "step-4")
    assert resolve_latest(str(root / "step-2")) == str(root / "step-2")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_latest(f"latest:{tmp_path / 'empty'}")
