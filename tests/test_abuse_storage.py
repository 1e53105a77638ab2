"""Storage abuse against a real ``p2r serve`` (issue 14 items 1-4 and 10, issue 17 items 1 and 6,
issue 25 items 10 and 13).

One server on the tiny model, started from ``hf://`` out of a pre-populated Hugging Face cache
in offline mode (the bootstrap path of a fresh cluster), with its object store reached through
a loopback relay the tests can make hang or refuse. Every refused reload is checked for its
gRPC status, for naming the tensor / file / key / endpoint at fault, and for the server still
answering afterwards with the weights it had before.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from p2r.services.checkpoints import MANIFEST, write_manifest
from p2r.services.client import Client
from p2r.services.launch import ServerProc, start_server
from p2r.v1 import p2r_pb2 as pb
from tests.storage_support import S3Relay, hf_cache

pytestmark = pytest.mark.engine

HF_REPO = "p2r-test/tiny"
HF_REVISION = "4e1f0c3b2a1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f"
ROLES = ["perceiver"]


@pytest.fixture(scope="module")
def relay(s3_server: dict[str, str]) -> Iterator[S3Relay]:
    r = S3Relay(s3_server["P2R_S3_ENDPOINT"])
    yield r
    r.close()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The model cache as a restarted pod finds it: the role's own subdirectory holds the Hub
    snapshot of the served model."""
    root = tmp_path_factory.mktemp("model-cache")
    hf_cache(tiny_model_dir, root / "-".join(ROLES) / "hf", HF_REPO, HF_REVISION)
    return root


@pytest.fixture(scope="module")
def server(cache: Path, relay: S3Relay, s3_server: dict[str, str], serve_config: Path) -> Iterator[ServerProc]:
    env = {**s3_server, "P2R_S3_ENDPOINT": relay.endpoint, "P2R_CHECKPOINT_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "P2R_S3_CONNECT_TIMEOUT_S": "2", "P2R_S3_READ_TIMEOUT_S": "2"}
    proc = start_server([*ROLES, "--model", f"hf://{HF_REPO}"], env=env, config=serve_config)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProc) -> Iterator[Client]:
    c = Client(server.target, timeout_s=120, admin_target=server.admin_target)
    c.wait_ready()
    yield c
    c.close()


PROBE = pb.PerceiveRequest(image=b"", question="Where is the cat?",
                           sampling=pb.SamplingParams(temperature=1.0, seed=11, max_tokens=24))


def outputs(client: Client, image: bytes) -> list[str]:
    """Seeded sampling: the same weights give the same text, other weights other text."""
    probe = pb.PerceiveRequest()
    probe.CopyFrom(PROBE)
    probe.image = image
    return [c.text for c in client.perceive_batch([probe])[0].completions]


@pytest.fixture(scope="module")
def image(synthetic_dir: Path) -> bytes:
    return next(p for p in sorted((synthetic_dir / "images").iterdir())).read_bytes()


@pytest.fixture(scope="module")
def served(client: Client, image: bytes) -> list[str]:
    """What the server answers on the weights it started with."""
    return outputs(client, image)


def refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def still_serving(client: Client, image: bytes, served: list[str]) -> None:
    assert client.status().checkpoint == f"hf://{HF_REPO}"
    assert outputs(client, image) == served, "a refused reload changed the served weights"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ bootstrap


def test_serves_a_hub_model_from_the_cache_offline(client: Client, served: list[str], cache: Path) -> None:
    """Issue 17 item 1: ``--model hf://ORG/NAME`` resolves in the role's cache subdirectory
    (no hub reachable: HF_HUB_OFFLINE=1) and a real engine serves it."""
    status = client.status()
    assert status.checkpoint == f"hf://{HF_REPO}" and list(status.roles) == ROLES
    assert served and all(isinstance(t, str) for t in served)
    assert (cache / "perceiver" / "hf" / "models--p2r-test--tiny" / "snapshots" / HF_REVISION).is_dir()


def test_models_upload_then_serve_reads_the_cache_on_the_second_load(
        client: Client, server: ServerProc, relay: S3Relay, s3_server: dict[str, str], second_model_dir: Path,
        tiny_model_dir: Path, cache: Path, image: bytes, served: list[str], tmp_path: Path) -> None:
    """``p2r models upload`` seeds the store; the server loads it (other weights, other text),
    mirrors it into its role's cache, and loading it again fetches no weight file again."""
    src = copy_model(second_model_dir, tmp_path / "seed1")
    (src / MANIFEST).unlink()  # a plain model directory, as on a volume
    done = subprocess.run([sys.executable, "-m", "p2r.cli", "models", "upload", str(src), "s3://models/seed1"],
                          env={**os.environ, **s3_server}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    try:
        assert client.load_checkpoint("s3://models/seed1").uri == "s3://models/seed1"
        swapped = outputs(client, image)
        assert swapped != served, "the uploaded model's weights are not the ones served"
        mirrored = cache / "perceiver" / "s3" / "models" / "seed1"
        assert (mirrored / "model.safetensors").is_file() and (mirrored / MANIFEST).is_file()
        fetched = relay.gets("/seed1/model.safetensors")
        assert fetched == 1
        client.load_checkpoint(f"file://{tiny_model_dir}")
        client.load_checkpoint("s3://models/seed1")  # what a restarted pod does: from the cache
        assert relay.gets("/seed1/model.safetensors") == fetched and outputs(client, image) == swapped
    finally:
        client.load_checkpoint(f"hf://{HF_REPO}")
    still_serving(client, image, served)


# -------------------------------------------------------------------------- bad checkpoints


def test_wrong_shape_or_dtype_is_refused_before_the_engine_is_touched(
        client: Client, tiny_model_dir: Path, image: bytes, served: list[str], tmp_path: Path) -> None:
    """Issue 14 item 1: a tensor of the wrong shape used to kill the engine (EngineDeadError,
    exit 1). Now FAILED_PRECONDITION names the tensor and the old weights keep serving."""
    import torch
    from safetensors.torch import load_file, save_file

    for case in ("shape", "dtype"):
        bad = copy_model(tiny_model_dir, tmp_path / case)
        tensors = load_file(bad / "model.safetensors")
        name = next(k for k in sorted(tensors) if k.endswith("mlp.up_proj.weight"))
        t = tensors[name]
        tensors[name] = t[: t.shape[0] // 2].contiguous() if case == "shape" else t.to(torch.int32)
        save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
        write_manifest(bad)  # a manifest that verifies: the check is about the tensors themselves
        code, message = refused(lambda b=bad: client.load_checkpoint(str(b)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, message
        assert f"tensor {name} has {case}" in message, message
        still_serving(client, image, served)


def test_non_finite_weights_are_refused_naming_the_tensor(
        client: Client, tiny_model_dir: Path, image: bytes, served: list[str], tmp_path: Path) -> None:
    """Issue 25 item 13: an all-NaN checkpoint (manifest and layout fine) was loaded and then
    answered empty completions with status OK. Now FAILED_PRECONDITION names the first tensor
    (read one slice at a time before the engine is touched) and the old weights keep serving."""
    from safetensors.torch import load_file, save_file

    bad = copy_model(tiny_model_dir, tmp_path / "nan")
    tensors = load_file(bad / "model.safetensors")
    for t in tensors.values():
        if t.is_floating_point():
            t.fill_(float("nan"))
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    write_manifest(bad)
    code, message = refused(lambda: client.load_checkpoint(str(bad)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    first = min(k for k, t in tensors.items() if t.is_floating_point())
    assert f"tensor {first} holds non-finite values" in message, message
    still_serving(client, image, served)


@pytest.mark.parametrize("case", ["unlisted weights", "empty manifest", "non-JSON manifest", "corrupt safetensors"])
def test_checkpoints_the_manifest_does_not_bind_are_refused(
        case: str, client: Client, tiny_model_dir: Path, second_model_dir: Path, image: bytes,
        served: list[str], tmp_path: Path) -> None:
    """Issue 14 items 2 and 10: an extra ``zz-extra.safetensors`` (holding other, valid weights
    that would go live), ``files: {}``, a manifest that is not JSON, and a weight file that is
    not safetensors (listed with its true digest) are each FAILED_PRECONDITION naming the file."""
    bad = copy_model(tiny_model_dir, tmp_path / "bad")
    if case == "unlisted weights":
        shutil.copyfile(second_model_dir / "model.safetensors", bad / "zz-extra.safetensors")
        named = "zz-extra.safetensors is not listed in the manifest"
    elif case == "empty manifest":
        (bad / MANIFEST).write_text(json.dumps({"files": {}}))
        named = "manifest.json lists no files"
    elif case == "non-JSON manifest":
        (bad / MANIFEST).write_text("files: [not json")
        named = "manifest.json is not valid JSON"
    else:
        (bad / "model.safetensors").write_bytes(b"\xff" * 4096)
        write_manifest(bad)
        named = f"{bad / 'model.safetensors'}: not a valid safetensors file"
    code, message = refused(lambda: client.load_checkpoint(str(bad)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert named in message, message
    still_serving(client, image, served)


def test_absolute_object_key_is_refused_and_nothing_is_written_outside(
        client: Client, s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
        cache: Path, image: bytes, served: list[str], tmp_path: Path) -> None:
    """Issue 14 item 3: an object ``abs//<absolute path>`` under the checkpoint prefix."""
    from p2r.services.checkpoints import s3_client, upload_checkpoint

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    upload_checkpoint(tiny_model_dir, "s3://evil/ckpt")
    outside = tmp_path / "outside" / "planted.json"
    s3_client().fput_object("evil", f"ckpt/abs/{outside}", str(tiny_model_dir / "config.json"))
    code, message = refused(lambda: client.load_checkpoint("s3://evil/ckpt"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert f"key 'abs/{outside}' is not a safe relative path" in message, message
    assert not outside.parent.exists()
    assert not (cache / "perceiver" / "s3" / "evil" / "ckpt" / "model.safetensors").exists()
    still_serving(client, image, served)


@pytest.mark.parametrize("case", ["300-character key", "file and directory"])
def test_s3_keys_the_cache_cannot_hold_are_failed_precondition(
        case: str, client: Client, s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        tiny_model_dir: Path, image: bytes, served: list[str]) -> None:
    """Issue 25 item 10: a manifest-listed key of 300 characters (OSError errno 36 in the cache)
    and keys ``extra`` plus ``extra/b.json`` (FileExistsError) answered INTERNAL. Both are
    FAILED_PRECONDITION naming the key, and the old weights keep serving."""
    from tests.storage_support import s3_checkpoint_with_keys

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    long_key = "w" * 288 + ".safetensors"
    extra = {long_key: b"w"} if case == "300-character key" else {"extra": b"file", "extra/b.json": b"{}"}
    uri = f"s3://keys-{case.split()[0].replace('-', '')}/ckpt"
    s3_checkpoint_with_keys(tiny_model_dir, uri, extra)
    code, message = refused(lambda: client.load_checkpoint(uri))
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message
    assert (long_key if case == "300-character key" else "'extra' cannot be a file and a directory") in message, \
        message
    still_serving(client, image, served)


# ----------------------------------------------------------------------- a failing store


def test_hanging_store_does_not_block_the_next_reload(
        client: Client, relay: S3Relay, second_model_dir: Path, image: bytes, served: list[str]) -> None:
    """Issue 14 item 4: a store that accepts connections and never answers. The abandoned
    reload frees the reload slot (a second reload meanwhile is "reload in progress"), and a
    valid local reload right after it works."""
    results: list[tuple[grpc.StatusCode, str]] = []
    connections = relay.connections
    relay.mode = "hang"
    try:
        hanging = threading.Thread(target=lambda: results.append(
            refused(lambda: client.load_checkpoint("s3://stuck/ckpt", timeout_s=4))))
        hanging.start()
        while relay.connections == connections and hanging.is_alive():
            threading.Event().wait(0.05)  # the server is now waiting on the store
        code, message = refused(lambda: client.load_checkpoint(str(second_model_dir), timeout_s=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "reload in progress" in message, message
        hanging.join()
    finally:
        relay.mode = "forward"
    assert results and results[0][0] == grpc.StatusCode.DEADLINE_EXCEEDED, results
    try:
        assert client.load_checkpoint(str(second_model_dir), timeout_s=120).uri == str(second_model_dir)
        assert outputs(client, image) != served
    finally:
        client.load_checkpoint(f"hf://{HF_REPO}")
    still_serving(client, image, served)


def test_unreachable_store_is_unavailable_naming_the_endpoint(
        client: Client, relay: S3Relay, image: bytes, served: list[str]) -> None:
    """Issue 14 item 10: a store that refuses connections (today INTERNAL after 6 s)."""
    relay.mode = "reset"
    try:
        code, message = refused(lambda: client.load_checkpoint("s3://gone/ckpt", timeout_s=60))
    finally:
        relay.mode = "forward"
    assert code == grpc.StatusCode.FAILED_PRECONDITION, message  # the server is fine, its store is not
    assert f"object store {relay.endpoint} unreachable" in message, message
    still_serving(client, image, served)
