"""Server configuration: YAML file, ``P2R_*`` environment overrides, flags, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from p2r.services.config import load_config


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("roles: [perceiver, reasoner]\nmodel: /models/a\nmax_in_flight: 3\n"
                    "limits:\n  max_num_seqs: 4\n  max_model_len: 2048\n")
    monkeypatch.setenv("P2R_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("P2R_LIMITS__MAX_MODEL_LEN", "4096")
    config = load_config(path, port=0)
    assert config.roles == ["perceiver", "reasoner"] and config.model == "/models/a"
    assert config.max_in_flight == 7  # env beats file
    assert (config.limits.max_num_seqs, config.limits.max_model_len) == (4, 4096)  # nested merge
    assert config.port == 0  # flags beat both
    assert load_config(path, max_in_flight=9).max_in_flight == 9


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="a model is required"):
        load_config(None, roles=["verifier"])
    assert load_config(None, roles=["gateway"], perceiver_endpoint="h:1", reasoner_endpoint="h:2").model is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\nroles: [perceiver]\nmax_in_flght: 3\n")
    with pytest.raises(ValidationError, match="max_in_flght"):
        load_config(bad)
    with pytest.raises(ValidationError, match="min_pixels"):
        load_config(None, model="/m", roles=["perceiver"], min_pixels=10, max_pixels=5)
    with pytest.raises(FileNotFoundError, match="--config: no such file"):
        load_config(tmp_path / "missing.yaml")
