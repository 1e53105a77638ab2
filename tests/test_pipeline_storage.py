"""Object storage as the controller uses it, against a real S3-protocol server (moto, on
loopback, own process) through the ``minio`` client: a multipart upload of a large weight file,
verification of every file against the manifest, and torn uploads that must never be used."""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2r.controller.storage import read_json, verify_checkpoint
from p2r.services.checkpoints import (
    MANIFEST,
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    s3_client,
    upload_checkpoint,
    write_manifest,
)

BIG = 70 * 1024 * 1024  # above upload_checkpoint's 64 MiB part size: two parts


@pytest.fixture()
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    yield f"bkt-{uuid.uuid4().hex[:10]}"


def checkpoint(path: Path, weights: int, step: int) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"step": step}))
    with (path / "model.safetensors").open("wb") as f:
        f.write(os.urandom(weights))
    (path / "tokenizer.json").write_text("{}")
    write_manifest(path, step=step)
    return path


def test_multipart_upload_of_a_large_file_verifies(tmp_path: Path, s3: str) -> None:
    local = checkpoint(tmp_path / "c", BIG, 7)
    uri = f"s3://{s3}/run/stage1/step-7"
    upload_checkpoint(local, uri)
    stat = s3_client().stat_object(s3, "run/stage1/step-7/model.safetensors")
    assert stat.size == BIG and stat.etag.endswith("-2")  # two parts, assembled by the server
    info = verify_checkpoint(uri)
    assert info == {"uri": uri, "files": 3, "bytes": BIG + (local / "config.json").stat().st_size + 2, "step": 7}
    assert latest_checkpoint(f"s3://{s3}/run/stage1") == f"{uri}/"


def test_verification_catches_replaced_and_missing_objects(tmp_path: Path, s3: str) -> None:
    uri = f"s3://{s3}/run/stage2/step-3"
    upload_checkpoint(checkpoint(tmp_path / "c", 4096, 3), uri)
    client = s3_client()
    good = client.get_object(s3, "run/stage2/step-3/model.safetensors").read()
    client.put_object(s3, "run/stage2/step-3/model.safetensors", io.BytesIO(b"x" * 4096), 4096)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the manifest \(sha256\)"):
        verify_checkpoint(uri)
    client.put_object(s3, "run/stage2/step-3/model.safetensors", io.BytesIO(good), len(good))
    assert verify_checkpoint(uri)["files"] == 3
    client.remove_object(s3, "run/stage2/step-3/tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is listed in the manifest but missing"):
        verify_checkpoint(uri)


def test_a_torn_multipart_upload_leaves_nothing_usable(tmp_path: Path, s3: str) -> None:
    """An upload cut off mid-way: parts were sent, the upload was never completed (a killed
    trainer pod), and the manifest, which goes last, never arrived."""
    local = checkpoint(tmp_path / "c", 6 * 1024 * 1024, 9)
    client = s3_client()
    client.make_bucket(s3)
    prefix = "run/stage1/step-9"
    client.fput_object(s3, f"{prefix}/config.json", str(local / "config.json"))
    data = (local / "model.safetensors").read_bytes()
    upload_id = client._create_multipart_upload(s3, f"{prefix}/model.safetensors", {})
    client._upload_part(s3, f"{prefix}/model.safetensors", data[: 5 * 1024 * 1024], None, upload_id, 1)
    assert [u.upload_id for u in client._list_multipart_uploads(s3).uploads] == [upload_id]

    with pytest.raises(CheckpointError, match=r"no manifest\.json \(incomplete upload\?\)"):
        verify_checkpoint(f"s3://{s3}/{prefix}")
    assert complete_checkpoints(f"s3://{s3}/run/stage1") == []
    assert latest_checkpoint(f"s3://{s3}/run/stage1") is None
    names = [o.object_name for o in client.list_objects(s3, prefix=f"{prefix}/", recursive=True)]
    assert names == [f"{prefix}/config.json"]  # the half-sent weights are not an object

    # A manifest that arrived although a listed object did not (a non-conforming writer).
    client.fput_object(s3, f"{prefix}/{MANIFEST}", str(local / MANIFEST))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is listed in the manifest but missing"):
        verify_checkpoint(f"s3://{s3}/{prefix}")


def test_manifest_must_list_weights_and_config(tmp_path: Path, s3: str) -> None:
    local = tmp_path / "c"
    local.mkdir()
    (local / "tokenizer.json").write_text("{}")
    write_manifest(local)
    upload_checkpoint(local, f"s3://{s3}/x/step-1")
    with pytest.raises(CheckpointError, match=r"lists no config\.json or no \*\.safetensors"):
        verify_checkpoint(f"s3://{s3}/x/step-1")


def test_local_checkpoints_need_their_manifest(tmp_path: Path) -> None:
    local = checkpoint(tmp_path / "run" / "step-1", 1024, 1)
    assert verify_checkpoint(str(local))["step"] == 1
    assert verify_checkpoint(f"file://{local}")["files"] == 3
    (local / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        verify_checkpoint(str(local))


def test_read_json_from_s3_and_disk(tmp_path: Path, s3: str) -> None:
    client = s3_client()
    client.make_bucket(s3)
    body = json.dumps({"overall": 12.5}).encode()
    client.put_object(s3, "run/eval/summary.json", io.BytesIO(body), len(body))
    assert read_json(f"s3://{s3}/run/eval/summary.json") == {"overall": 12.5}
    with pytest.raises(FileNotFoundError, match="no such object"):
        read_json(f"s3://{s3}/run/eval/missing.json")
    (tmp_path / "s.json").write_text('{"n": 3}')
    assert read_json(str(tmp_path / "s.json")) == {"n": 3}
    with pytest.raises(FileNotFoundError):
        read_json(str(tmp_path / "none.json"))
