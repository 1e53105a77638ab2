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
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match the manifest \(sha256\)"):
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
        made = fake_checkpoint(tmp_path / f"l{step}", step)
        (made / "train_state").mkdir()
        (made / "train_state" / "__0_0.distcp").write_bytes(b"optimiser shard")
        write_manifest(made, step=step)
        upload_checkpoint(made, f"{root}/step-{step}")
    from p2r.services.checkpoints import s3_client

    partial = fake_checkpoint(tmp_path / "l25", 25)
    s3_client().fput_object("p2r-run", "exp1/stage1/step-25/model.safetensors", str(partial / "model.safetensors"))
    assert complete_checkpoints(root) == [(5, f"{root}/step-5/"), (15, f"{root}/step-15/")]
    latest = latest_checkpoint(root)
    assert latest == f"{root}/step-15/"
    local = resolve_checkpoint(latest, tmp_path / "cache")
    assert json.loads((local / "config.json").read_text()) == {"step": 15}
    # A model reader (the next stage, a server) fetches the model's files only; a resume all.
    assert not (local / "train_state").exists()
    resumed = resolve_checkpoint(latest, tmp_path / "cache", with_train_state=True)
    assert (resumed / "train_state" / "__0_0.distcp").read_bytes() == b"optimiser shard"
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
    with pytest.raises(CheckpointError, match=r"train_state/__1_0\.distcp is listed in the manifest but missing"):
        verify_checkpoint_dir(local, with_train_state=True)  # rank 1's shard has not arrived: no resume
    # A model reader (a server, an evaluation, the next stage) neither needs nor hashes train_state/.
    assert verify_checkpoint_dir(local) == local
    (local / "train_state" / "__0_0.distcp").write_bytes(b"tampered")
    assert verify_checkpoint_dir(local) == local
    with pytest.raises(CheckpointError, match=r"train_state/__0_0\.distcp does not match"):
        verify_checkpoint_dir(local, with_train_state=True)
    (local / "train_state" / "__0_0.distcp").write_bytes(b"rank0")
    target = tmp_path / "root" / "step-1"
    put_files(local, ["train_state/__0_0.distcp"], str(target))
    (target / "train_state" / "__1_0.distcp").write_bytes(b"rank1")  # what rank 1 uploads
    put_files(local, [n for n in files if n not in other] + [MANIFEST], str(target))  # what rank 0 uploads
    assert verify_checkpoint_dir(target, with_train_state=True) == target


def test_latest_names_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "stage1"
    fake_checkpoint(root / "step-2", 2)
    fake_checkpoint(root / "step-4", 4)
    (root / "step-9").mkdir()  # torn: no manifest
    assert resolve_latest(f"latest:{root}") == str(root / "step-4")
    assert resolve_latest(str(root / "step-2")) == str(root / "step-2")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_latest(f"latest:{tmp_path / 'empty'}")


# ------------------------------------------------------- what binds a checkpoint (issue 14/16)


def bound_checkpoint(path: Path) -> Path:
    """A complete checkpoint: config, weights, tokenizer and the manifest that binds them."""
    return fake_checkpoint(path, 7)


def s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], endpoint: str | None = None) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if endpoint is not None:
        monkeypatch.setenv("P2R_S3_ENDPOINT", endpoint)


BAD_CHECKPOINTS = {
    # name -> (how to spoil a bound checkpoint directory, what the error must name)
    "unlisted weights": (lambda d: (d / "zz-extra.safetensors").write_bytes(b"x" * 64),
                         r"zz-extra\.safetensors is not listed"),
    "empty manifest": (lambda d: (d / MANIFEST).write_text('{"files": {}}'), r"manifest\.json lists no files"),
    "non-JSON manifest": (lambda d: (d / MANIFEST).write_text("{not json"), r"manifest\.json is not valid JSON"),
    "escaping name": (lambda d: (d / MANIFEST).write_text(json.dumps(
        {"files": {"../../etc/passwd": "0" * 64, **json.loads((d / MANIFEST).read_text())["files"]}})),
        r"key '\.\./\.\./etc/passwd' is not a safe relative path"),
    "no weights listed": (lambda d: (d / MANIFEST).write_text(json.dumps(
        {"files": {"config.json": json.loads((d / MANIFEST).read_text())["files"]["config.json"]}})),
        r"model\.safetensors is not listed|lists no config\.json or no \*\.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_every_reader_refuses_the_same_bad_checkpoints(case: str, tmp_path: Path, s3_server: dict[str, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One definition of completeness (``verify_manifest``): the server's loader (local and S3)
    and the controller's streamed check refuse the same checkpoints with the same words."""
    from p2r.controller.storage import verify_checkpoint

    spoil, named = BAD_CHECKPOINTS[case]
    local = bound_checkpoint(tmp_path / "c")
    spoil(local)
    with pytest.raises(CheckpointError, match=named):
        resolve_checkpoint(str(local), tmp_path / "cache")
    with pytest.raises(CheckpointError, match=named):
        resolve_checkpoint(str(local), tmp_path / "cache", allow_unverified_local=True)  # a manifest is enforced
    with pytest.raises(CheckpointError, match=named):
        verify_checkpoint(str(local))
    s3_env(monkeypatch, s3_server)
    uri = f"s3://bad-{case.replace(' ', '-').lower()}/ck"
    put_files(local, sorted(p.name for p in local.iterdir()), uri)
    with pytest.raises(CheckpointError, match=named):
        resolve_checkpoint(uri, tmp_path / "cache")
    with pytest.raises(CheckpointError, match=named):
        verify_checkpoint(uri)
    # Refused from the listing and the manifest alone: not one weight byte was downloaded.
    assert not (tmp_path / "cache" / "s3" / uri[5:].split("/")[0] / "ck" / "model.safetensors").exists()


def test_a_local_directory_needs_its_manifest_unless_allowed(tmp_path: Path) -> None:
    local = bound_checkpoint(tmp_path / "c")
    (local / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"no manifest\.json .*allow_unverified_local"):
        resolve_checkpoint(str(local), tmp_path / "cache")
    assert resolve_checkpoint(f"file://{local}", tmp_path / "cache", allow_unverified_local=True) == local


@pytest.mark.parametrize("key", ["/etc/x", "abs//etc/x", "a/../../x", "..", "a/./b", "a/", "", "a\\..\\b", "a\x00b"])
def test_unsafe_keys_are_refused_by_name(key: str, tmp_path: Path) -> None:
    from p2r.services.checkpoints import destination

    with pytest.raises(CheckpointError, match="not a safe relative path"):
        destination(tmp_path, key, "s3://b/p")


def test_a_key_through_a_symlink_out_of_the_target_is_refused(tmp_path: Path) -> None:
    from p2r.services.checkpoints import destination

    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert destination(tmp_path / "target", "a/b.json", "u") == (tmp_path / "target" / "a" / "b.json").resolve()
    with pytest.raises(CheckpointError, match="resolves outside"):
        destination(tmp_path / "target", "link/x", "u")


def test_s3_object_with_an_absolute_key_writes_nothing_outside(tmp_path: Path, s3_server: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14 item 3: ``abs//<absolute path>`` under a checkpoint or data prefix is refused,
    naming the key, by the checkpoint download and by ``p2r eval --data s3://``."""
    from click.testing import CliRunner

    from p2r.cli import cli
    from p2r.services.checkpoints import download_prefix, s3_client

    s3_env(monkeypatch, s3_server)
    upload_checkpoint(bound_checkpoint(tmp_path / "c"), "s3://absk/ck")
    outside = tmp_path / "outside" / "pwned.txt"
    client = s3_client()
    for prefix in ("ck", "data"):
        client.fput_object("absk", f"{prefix}/abs/{outside}", str(tmp_path / "c" / "config.json"))
        assert f"{prefix}/abs/{outside}" in [o.object_name for o in client.list_objects("absk", recursive=True)]
    with pytest.raises(CheckpointError, match=rf"key 'abs/{outside}' is not a safe relative path"):
        resolve_checkpoint("s3://absk/ck", tmp_path / "cache")
    with pytest.raises(CheckpointError, match=rf"key 'abs/{outside}' is not a safe relative path"):
        download_prefix("s3://absk/data", tmp_path / "data")
    monkeypatch.setenv("P2R_CACHE", str(tmp_path / "evalcache"))
    result = CliRunner().invoke(cli, ["eval", "--task", "synthetic", "--data", "s3://absk/data", "--mode", "default",
                                      "--model", str(tmp_path / "c"), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 2 and f"abs/{outside}" in result.output, result.output
    assert not outside.exists() and not outside.parent.exists()


def test_s3_mirror_reuses_the_cached_copy_when_its_sha256_matches(tmp_path: Path, s3_server: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17 item 6: resolving again (a restart) reads the cache - the weights are not fetched
    again - while a tampered cached file is fetched again and a file the new manifest no longer
    lists is removed from the cache. GETs are counted on a relay in front of the S3 server."""
    from tests.storage_support import S3Relay

    s3_env(monkeypatch, s3_server)
    relay = S3Relay(s3_server["P2R_S3_ENDPOINT"])
    monkeypatch.setenv("P2R_S3_ENDPOINT", relay.endpoint)
    try:
        local = bound_checkpoint(tmp_path / "c")
        upload_checkpoint(local, "s3://cachek/m")
        first = resolve_checkpoint("s3://cachek/m", tmp_path / "cache")
        assert first == tmp_path / "cache" / "s3" / "cachek" / "m"
        assert relay.gets("/m/model.safetensors") == 1
        assert resolve_checkpoint("s3://cachek/m", tmp_path / "cache") == first
        assert relay.gets("/m/model.safetensors") == 1 and relay.gets("/m/manifest.json") == 2
        (first / "model.safetensors").write_bytes(b"tampered")
        resolve_checkpoint("s3://cachek/m", tmp_path / "cache")
        assert relay.gets("/m/model.safetensors") == 2
        assert (first / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
        (local / "tokenizer.json").unlink()  # the next version has one file fewer
        write_manifest(local, step=8)
        put_files(local, ["config.json", "model.safetensors", MANIFEST], "s3://cachek/m")
        from p2r.services.checkpoints import s3_client

        s3_client().remove_object("cachek", "m/tokenizer.json")
        resolve_checkpoint("s3://cachek/m", tmp_path / "cache")
        assert sorted(p.name for p in first.iterdir()) == ["config.json", MANIFEST, "model.safetensors"]
    finally:
        relay.close()


def test_an_unreachable_or_hanging_store_is_unavailable_naming_the_endpoint(
        tmp_path: Path, s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from p2r.services.checkpoints import StorageUnavailable
    from tests.storage_support import S3Relay

    s3_env(monkeypatch, s3_server)
    relay = S3Relay(s3_server["P2R_S3_ENDPOINT"])
    monkeypatch.setenv("P2R_S3_ENDPOINT", relay.endpoint)
    monkeypatch.setenv("P2R_S3_READ_TIMEOUT_S", "0.5")
    try:
        for mode in ("reset", "hang"):
            relay.mode = mode  # type: ignore[assignment]
            with pytest.raises(StorageUnavailable, match=rf"object store {relay.endpoint} unreachable"):
                resolve_checkpoint("s3://any/ck", tmp_path / "cache")
    finally:
        relay.close()


def test_a_cancelled_download_stops_and_leaves_no_partial_file(tmp_path: Path, s3_server: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from p2r.services.checkpoints import DownloadCancelled
    from tests.storage_support import S3Relay

    s3_env(monkeypatch, s3_server)
    local = bound_checkpoint(tmp_path / "c")
    (local / "model.safetensors").write_bytes(b"w" * (16 << 20))
    write_manifest(local)
    upload_checkpoint(local, "s3://cancelk/m")
    relay = S3Relay(s3_server["P2R_S3_ENDPOINT"])
    relay.mode = "slow"
    monkeypatch.setenv("P2R_S3_ENDPOINT", relay.endpoint)
    cancel = threading.Event()
    target = tmp_path / "cache" / "s3" / "cancelk" / "m"

    def cancel_once_a_partial_file_exists() -> None:
        while not cancel.is_set():
            if target.is_dir() and any(p.name.endswith(".partial") for p in target.iterdir()):
                cancel.set()
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=cancel_once_a_partial_file_exists, daemon=True)
    watcher.start()
    try:
        with pytest.raises(DownloadCancelled, match="download cancelled"):
            resolve_checkpoint("s3://cancelk/m", tmp_path / "cache", cancel=cancel)
    finally:
        cancel.set()
        relay.close()
    assert not any(p.name.endswith(".partial") for p in target.iterdir())
    assert not (target / "model.safetensors").exists()


LONG_KEY = "w" * 288 + ".safetensors"
KEYS_THE_CACHE_CANNOT_HOLD = {
    # name -> (extra objects, listed in the manifest with their true digests; what the error names)
    "300-character key": ({LONG_KEY: b"w"}, rf"key '{LONG_KEY}' has a path segment over 200 bytes"),
    "file and directory": ({"extra": b"file", "extra/b.json": b"{}"},
                           r"lists both 'extra' and 'extra/b\.json': 'extra' cannot be a file and a directory"),
}


@pytest.mark.parametrize("case", sorted(KEYS_THE_CACHE_CANNOT_HOLD))
def test_s3_keys_the_cache_cannot_hold_are_refused_by_name(case: str, tmp_path: Path, s3_server: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25 item 10: a manifest-listed key of 300 characters (ENAMETOOLONG in the cache) and
    keys ``a`` plus ``a/b`` (FileExistsError) escaped as OSError, so a reload answered INTERNAL.
    Both are CheckpointError (FAILED_PRECONDITION) naming the key, before a weight is fetched."""
    from tests.storage_support import s3_checkpoint_with_keys

    s3_env(monkeypatch, s3_server)
    extra, named = KEYS_THE_CACHE_CANNOT_HOLD[case]
    uri = f"s3://keys-{case.replace(' ', '-')[:20].lower()}/ck"
    s3_checkpoint_with_keys(bound_checkpoint(tmp_path / "c"), uri, extra)
    with pytest.raises(CheckpointError, match=named):
        resolve_checkpoint(uri, tmp_path / "cache")
    assert not (tmp_path / "cache" / "s3" / uri[5:] / "model.safetensors").exists()


def test_a_file_that_became_a_directory_between_versions_still_loads(
        tmp_path: Path, s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The cached mirror of version 1 holds ``extra/b.json``; version 2 lists a file ``extra``
    (and back again). The stale entries are cleared before the download, so each loads instead
    of failing in the cache (IsADirectoryError / FileExistsError) on every reload."""
    from p2r.services.checkpoints import s3_client
    from tests.storage_support import s3_checkpoint_with_keys

    s3_env(monkeypatch, s3_server)
    local = bound_checkpoint(tmp_path / "c")
    client = s3_client()
    for version in ({"extra/b.json": b"{}"}, {"extra": b"file"}, {"extra/b.json": b"[]"}):
        if client.bucket_exists("versions"):
            for o in client.list_objects("versions", recursive=True):
                client.remove_object("versions", o.object_name)
        s3_checkpoint_with_keys(local, "s3://versions/ck", version)
        mirror = resolve_checkpoint("s3://versions/ck", tmp_path / "cache")
        for key, data in version.items():
            assert (mirror / key).read_bytes() == data


def test_hf_uris_resolve_from_the_hugging_face_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from p2r.services.checkpoints import StorageUnavailable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    local = bound_checkpoint(tmp_path / "c")
    rev = "0123456789abcdef0123456789abcdef01234567"
    from tests.storage_support import hf_cache

    snapshot = hf_cache(local, tmp_path / "cache" / "hf", "p2r-org/tiny", rev)
    assert resolve_checkpoint("hf://p2r-org/tiny", tmp_path / "cache") == snapshot
    assert resolve_checkpoint(f"hf://p2r-org/tiny@{rev}", tmp_path / "cache") == snapshot
    with pytest.raises(StorageUnavailable, match=r"hf://p2r-org/other: not in the model cache .* the Hub https?://"):
        resolve_checkpoint("hf://p2r-org/other", tmp_path / "cache")
    for bad in ("hf://noslash", "hf://../x", "hf://a/b/c"):
        with pytest.raises(CheckpointError, match=r"expected hf://ORG/NAME\[@revision\]"):
            resolve_checkpoint(bad, tmp_path / "cache")


def test_models_upload_seeds_object_storage_and_reads_back(tmp_path: Path, s3_server: dict[str, str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``p2r models upload SRC s3://...`` (issue 17 item 1): a model directory without a manifest
    (a read-only volume) goes up with one computed for it, written last; the uploaded prefix
    resolves back verified, file for file. Bad input is one line and exit 2."""
    from click.testing import CliRunner

    from p2r.cli import cli

    s3_env(monkeypatch, s3_server)
    src = bound_checkpoint(tmp_path / "model")
    (src / MANIFEST).unlink()
    src.chmod(0o555)  # read-only, as a mounted volume: no manifest is written into it
    try:
        result = CliRunner().invoke(cli, ["models", "upload", str(src), "s3://seed/models/tiny"])
    finally:
        src.chmod(0o755)
    assert result.exit_code == 0, result.output
    assert "3 of 3 files uploaded (0 already there" in result.output and not (src / MANIFEST).exists()
    back = resolve_checkpoint("s3://seed/models/tiny", tmp_path / "cache")
    assert sorted(p.name for p in back.iterdir()) == ["config.json", MANIFEST, "model.safetensors", "tokenizer.json"]
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (back / name).read_bytes() == (src / name).read_bytes()
    (tmp_path / "empty").mkdir()
    for args, named in ([str(tmp_path / "missing"), "s3://seed/x"], "no such directory"), \
                       ([str(tmp_path / "empty"), "s3://seed/x"], "no config.json"), \
                       ([str(src), "http://seed/x"], "the destination must be s3://"), \
                       ([str(src), "s3://seed"], "expected s3://BUCKET/PREFIX"):
        result = CliRunner().invoke(cli, ["models", "upload", *args])
        assert result.exit_code == 2, result.output
        assert named in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_reload_layout_check_names_the_tensor(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What Admin.LoadCheckpoint checks before it touches the engine (issue 14 item 1): the same
    tensor names, shapes and compatible dtypes as the running model, and only finite values
    (issue 25 item 13). A tied head stored
    explicitly (as a trainer's checkpoint may) is the same layout; bf16 for fp32 is castable."""
    import torch
    from safetensors.torch import load_file, save_file

    from p2r.services.engine import check_layout, checkpoint_layout

    running = checkpoint_layout(tiny_model_dir)
    assert "lm_head.weight" in running

    def variant(name: str, change: object) -> Path:
        d = tmp_path / name
        shutil.copytree(tiny_model_dir, d)
        tensors = load_file(d / "model.safetensors")
        change(tensors)  # type: ignore[operator]
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        write_manifest(d)
        return d

    key = next(k for k in sorted(running) if k.endswith("mlp.up_proj.weight"))
    with_head = variant("head", lambda t: t.__setitem__("lm_head.weight", t[next(
        k for k in t if k.endswith("language_model.embed_tokens.weight"))].clone()))
    check_layout(checkpoint_layout(with_head), running, "head")
    bf16 = variant("bf16", lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    check_layout(checkpoint_layout(bf16), running, "bf16")
    for name, change, message in (
        ("shape", lambda t: t.__setitem__(key, t[key][:1].contiguous()), rf"tensor {key} has shape \[1, "),
        ("dtype", lambda t: t.__setitem__(key, t[key].to(torch.int32)), rf"tensor {key} has dtype I32"),
        ("missing", lambda t: t.pop(key), rf"tensor {key} is missing"),
        ("extra", lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)), "tensor model.extra.weight is not"),
        # Issue 25 item 13: non-finite weights load and then generate nothing; refused by name.
        ("inf", lambda t: t[key].view(-1)[-1].fill_(float("inf")), rf"tensor {key} holds non-finite values"),
        ("all-nan", lambda t: [v.fill_(float("nan")) for v in t.values() if v.is_floating_point()],
         rf"tensor {sorted(set(running) - {'lm_head.weight'})[0]} holds non-finite values"),
    ):
        with pytest.raises(CheckpointError, match=message):
            check_layout(checkpoint_layout(variant(name, change)), running, name)
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_model_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{not a header")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        checkpoint_layout(garbage)


def test_each_role_set_has_its_own_model_cache(tmp_path: Path) -> None:
    """Issue 17 item 6: pods of different roles sharing one cache volume never write into the
    same directory; the chart documents the layout (``<cache>/<roles>/s3|hf``)."""
    from p2r.services.config import ServeConfig

    def cache_of(*roles: str) -> Path:
        return ServeConfig(roles=list(roles), model="m", checkpoint_cache=tmp_path, metrics_port=None).model_cache

    assert cache_of("perceiver") == tmp_path / "perceiver"
    assert cache_of("reasoner") == tmp_path / "reasoner"
    assert cache_of("perceiver", "reasoner", "verifier", "gateway") == tmp_path / "perceiver-reasoner-verifier-gateway"
    assert not ServeConfig(model="m").allow_unverified_local  # off unless a deployment turns it on
