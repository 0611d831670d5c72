"""Settings precedence (defaults < TOML file < NCF_STREAM_* environment < flags), the one
declaration per setting that the configs mirror, and `ncf-stream config`."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest

from consumers.cli import main
from ncf_stream.errors import ConfigError
from ncf_stream.evaluator import EvalConfig, OnlineHitRate
from ncf_stream.events import DEFAULT_MAX_RECORD_BYTES
from ncf_stream.model import NeuMFConfig
from ncf_stream.recommend import Recommender
from ncf_stream.retrieval import IndexConfig
from ncf_stream.sampler import SamplerConfig
from ncf_stream.settings import Settings, config_values, default, shared_fields
from ncf_stream.snapshot import Publisher
from ncf_stream.store import InteractionStore
from ncf_stream.trainer import TrainerConfig

ROOT = Path(__file__).resolve().parents[1]


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


# ---- one declaration per setting ------------------------------------------------------------

CONFIGS = [TrainerConfig, NeuMFConfig, SamplerConfig, EvalConfig, IndexConfig, OnlineHitRate]
# Config fields that mirror a setting of another name.
RENAMED = {
    (TrainerConfig, "alpha"): "negative_alpha",
    (SamplerConfig, "k"): "negatives",
    (SamplerConfig, "alpha"): "negative_alpha",
    (EvalConfig, "interval_s"): "eval_interval_s",
    (EvalConfig, "max_users"): "eval_max_users",
    (EvalConfig, "full"): "eval_full",
    (EvalConfig, "full_max_pairs"): "eval_full_max_pairs",
    (EvalConfig, "duty"): "eval_duty",
    (OnlineHitRate, "fraction"): "online_fraction",
}
# Same name as a setting, another knob: the evaluation protocol's 99 negatives.
NOT_SHARED = {(EvalConfig, "negatives")}


def expected_shared(cls: type) -> dict[str, str]:
    same_name = {f.name: f.name for f in dataclasses.fields(cls)
                 if f.name in Settings.model_fields and (cls, f.name) not in NOT_SHARED}
    return {**same_name, **{f: name for (c, f), name in RENAMED.items() if c is cls}}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_defaults_are_the_settings_defaults(cls: type) -> None:
    # A field that stopped mirroring its setting (a literal default written back in)
    # fails the first assertion even when its value still happens to agree.
    assert shared_fields(cls) == expected_shared(cls)
    made = cls()
    for field, name in expected_shared(cls).items():
        assert getattr(made, field) == default(name), f"{cls.__name__}.{field} vs {name}"


def test_plain_defaults_are_the_settings_defaults() -> None:
    def defaults(fn: object) -> dict[str, object]:
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}  # type: ignore[arg-type]

    assert defaults(Recommender)["candidates"] == default("candidates")
    assert defaults(Recommender)["max_k"] == default("max_k")
    publisher = defaults(Publisher)
    assert (publisher["every_s"], publisher["every_events"], publisher["index_refresh_s"]) == (
        default("publish_every_s"), default("publish_every_events"), default("index_refresh_s"))
    assert defaults(InteractionStore)["min_history"] == default("min_history")
    assert default("max_record_bytes") == DEFAULT_MAX_RECORD_BYTES


# A valid value other than the default for every setting a config mirrors.
OVERRIDES = {
    "batch_size": 1024, "negatives": 2, "negative_alpha": 0.75, "optimizer": "adam", "lr": 0.1,
    "weight_decay": 1e-4, "tower_lr": 0.01, "fresh_share": 0.25, "replay": False,
    "replay_ratio": 3.0, "min_history": 3, "holdout_fraction": 0.5, "seed": 7, "factors": 8,
    "mlp_layers": (16, 8), "device_step": "off",
    "dropout": 0.1, "history_length": 5, "history_decay": 0.5, "loss": "softmax",
    "eval_interval_s": 5.0, "eval_max_users": 50, "eval_full": False,
    "eval_full_max_pairs": 1000, "eval_duty": 0.5, "ivf_threshold": 10, "nprobe": 4,
    "retrieval_backend": "torch",
    "online_fraction": 0.5, "candidates": 40, "exact_items": 5, "background_policy": "nice",
}


def test_from_settings_copies_every_shared_field() -> None:
    mirrored = {name for cls in CONFIGS for name in shared_fields(cls).values()}
    assert mirrored <= set(OVERRIDES), "give the new setting a value in OVERRIDES"
    assert all(OVERRIDES[name] != default(name) for name in OVERRIDES)
    s = Settings(**OVERRIDES)
    built = {cls: cls.from_settings(s) for cls in (TrainerConfig, NeuMFConfig, EvalConfig,
                                                    IndexConfig)}
    built[SamplerConfig] = SamplerConfig(**config_values(SamplerConfig, s))
    built[OnlineHitRate] = OnlineHitRate(**config_values(OnlineHitRate, s))
    for cls, cfg in built.items():
        for field, name in shared_fields(cls).items():
            assert getattr(cfg, field) == OVERRIDES[name], f"{cls.__name__}.{field}"
    assert built[TrainerConfig].model == built[NeuMFConfig]
    assert built[EvalConfig].background == "nice"


def _outside(name: str) -> list[Any]:
    """Values just outside setting ``name``'s declared bounds."""
    info = Settings.model_fields[name]
    values: list[Any] = []
    for m in info.metadata:
        if isinstance(m, at.Ge):
            values.append(m.ge - 1)
        elif isinstance(m, at.Gt):
            values.append(m.gt)
        elif isinstance(m, at.Le):
            values.append(m.le + 1)
        elif isinstance(m, at.Lt):
            values.append(m.lt)
    if typing.get_origin(info.annotation) is typing.Literal:
        values.append("no-such-choice")
    if name == "mlp_layers":  # a Rule: odd first width, a zero width, no layers
        values += [(7, 4), (8, 0), ()]
    return values


OUT_OF_BOUNDS = [(cls, field, value) for cls in CONFIGS
                 for field, name in shared_fields(cls).items() for value in _outside(name)]


@pytest.mark.parametrize(("cls", "field", "value"), OUT_OF_BOUNDS,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in OUT_OF_BOUNDS])
def test_config_fields_hold_the_settings_bounds(cls: type, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field} = "):
        cls(**{field: value})
    with pytest.raises(ConfigError):  # and the settings, from the same declaration
        Settings.load(**{shared_fields(cls)[field]: value})


def test_boundary_values_are_inside() -> None:
    assert TrainerConfig(batch_size=16, fresh_share=1.0).batch_size == 16
    assert EvalConfig(max_users=0, duty=1.0).max_users == 0
    assert NeuMFConfig(mlp_layers=(2,)).mlp_dim == 1


def test_every_setting_says_why() -> None:
    missing = [n for n, info in Settings.model_fields.items() if not info.description]
    assert not missing


def test_module_constants_are_defined_once() -> None:
    """A constant two modules need is defined in one and imported by the other (KS, the
    eval cut-offs, and LAG_EVERY_S were each written twice)."""
    where: dict[str, list[str]] = {}
    for path in sorted([*(ROOT / "ncf_stream").rglob("*.py"), *(ROOT / "consumers").glob("*.py")]):
        if "proto" in path.parts:
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            for t in targets:
                if isinstance(t, ast.Name) and t.id.isupper():
                    where.setdefault(t.id, []).append(path.name)
    assert {name: files for name, files in where.items() if len(files) > 1} == {}


# ---- ncf-stream config -------------------------------------------------------------------------

def test_reference_doc_is_generated(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/configuration.md is `ncf-stream config --markdown`, byte for byte."""
    assert main(["config", "--markdown"]) == 0
    generated = capsys.readouterr().out
    doc = ROOT / "docs" / "configuration.md"
    assert doc.read_text() == generated, (
        "docs/configuration.md is stale: ncf-stream config --markdown > docs/configuration.md")
    for name in Settings.model_fields:
        assert f"| `{name}` | `NCF_STREAM_{name.upper()}` |" in generated


@pytest.fixture
def sources_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in list(os.environ):
        if var.startswith("NCF_STREAM_"):
            monkeypatch.delenv(var)
    path = tmp_path / "ncf.toml"
    path.write_text('batch_size = 1024\n[kafka]\ntopic = "file-topic"\ngroup_id = "file-group"\n'
                    '[kafka.client_options]\nsasl_plain_password = "hunter2"\n')
    monkeypatch.setenv("NCF_STREAM_KAFKA_GROUP_ID", "env-group")  # env over file
    monkeypatch.setenv("NCF_STREAM_NEGATIVES", "6")
    monkeypatch.setenv("NCF_STREAM_HTTP_PORT", "7000")  # the flag wins
    return path


def test_sources(sources_setup: Path) -> None:
    s, sources = Settings.load_with_sources(sources_setup, http_port=9000, grpc_port=None)
    assert (s.batch_size, sources["batch_size"]) == (1024, f"file {sources_setup}")
    assert (s.kafka_topic, sources["kafka_topic"]) == ("file-topic", f"file {sources_setup}")
    assert (s.kafka_group_id, sources["kafka_group_id"]) == (
        "env-group", "env NCF_STREAM_KAFKA_GROUP_ID")
    assert (s.negatives, sources["negatives"]) == (6, "env NCF_STREAM_NEGATIVES")
    assert (s.http_port, sources["http_port"]) == (9000, "flag")
    assert (s.grpc_port, sources["grpc_port"]) == (50051, "default")  # a None flag: not given
    assert (s.lr, sources["lr"]) == (default("lr"), "default")


def test_config_command_prints_values_and_sources(
        sources_setup: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--config", str(sources_setup), "--http-port", "9000"]) == 0
    out = capsys.readouterr().out
    lines = {line.split(" ", 1)[0]: line for line in out.splitlines() if " = " in line}
    assert lines["http_port"].endswith("# flag --http-port")
    assert lines["http_port"].startswith("http_port = 9000 ")
    assert lines["kafka_group_id"].endswith("# env NCF_STREAM_KAFKA_GROUP_ID")
    assert lines["kafka_topic"].endswith(f"# file {sources_setup}")
    assert lines["lr"].endswith("# default")
    assert "hunter2" not in out
    printed = tomllib.loads(out)  # the listing is itself a config file
    assert printed["negatives"] == 6 and printed["mlp_layers"] == [64, 32, 16]
    unset = {k for k, f in Settings.model_fields.items() if f.default is None}  # TOML has no null
    assert unset and set(printed) | unset == set(Settings.model_fields)
