"""Settings precedence: defaults < TOML file < NCF_STREAM_* environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from ncf_stream.errors import ConfigError
from ncf_stream.settings import Settings


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "ncf.toml"
    path.write_text(
        '[kafka]\ntopic = "from-file"\ngroup_id = "file-group"\nbootstrap = "file:1"\n'
        '[kafka.client_options]\nsecurity_protocol = "SASL_SSL"\n'
    )
    return path


def test_defaults_are_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NCF_STREAM_KAFKA_BOOTSTRAP", raising=False)  # set by CI for the tests
    s = Settings.load()
    assert (s.kafka_bootstrap, s.kafka_topic, s.kafka_dlq_topic, s.kafka_group_id) == (
        "127.0.0.1:9092", "interactions", "interactions.dlq", "ncf-stream")


def test_precedence(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCF_STREAM_KAFKA_GROUP_ID", "env-group")
    monkeypatch.setenv("NCF_STREAM_KAFKA_BOOTSTRAP", "env:1")
    s = Settings.load(config, kafka_bootstrap="flag:1", kafka_topic=None)
    assert s.kafka_topic == "from-file"  # file beats default; a None flag is not given
    assert s.kafka_group_id == "env-group"  # environment beats file
    assert s.kafka_bootstrap == "flag:1"  # flag beats environment
    assert s.kafka_client_options == {"security_protocol": "SASL_SSL"}


@pytest.mark.parametrize(
    ("text", "match"),
    [("[kafka]\nmax_poll_records = 0\n", "max_poll_records"),
     ("not = [toml", "not valid TOML"),
     ("[kafka]\nno_such_option = 1\n", "no_such_option")],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        Settings.load(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.load(tmp_path / "nope.toml")
