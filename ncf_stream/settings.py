"""One settings object: defaults < TOML file < ``NCF_STREAM_*`` environment < flags.

Fields are flat (``kafka_bootstrap``) so that each has exactly one environment
name (``NCF_STREAM_KAFKA_BOOTSTRAP``); a TOML file may group them in tables,
``[kafka] bootstrap = "..."`` being ``kafka_bootstrap``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ncf_stream.errors import ConfigError
from ncf_stream.threads import BackgroundPolicy


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NCF_STREAM_", extra="forbid")

    # Kafka (ARCHITECTURE.md, "Kafka defaults")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic: str = "interactions"
    kafka_dlq_topic: str = "interactions.dlq"
    kafka_group_id: str = "ncf-stream"
    kafka_max_poll_records: int = Field(8192, ge=1)  # one micro-batch worth of events
    kafka_poll_timeout_s: float = Field(0.2, gt=0)
    # Passed to kafka-python as is: security_protocol, sasl_mechanism,
    # sasl_plain_username, ssl_cafile, ... (see kafka-python's KafkaConsumer).
    kafka_client_options: dict[str, Any] = Field(default_factory=dict)
    # Run the consumer and the decoder in a process of their own (consumers.source_process):
    # their pure-Python record parsing then never holds the GIL that requests need.
    kafka_source_process: bool = True
    # How the trainer and the source's decoder yield the CPU to requests: "idle" is
    # SCHED_IDLE (Linux; they run only when nothing else wants a core), "nice" is nice 19.
    background_policy: BackgroundPolicy = "idle"

    # Event contract
    max_record_bytes: int = Field(4096, ge=64)
    event_types: list[str] | None = None  # keep only these event types; None keeps all
    min_weight: float | None = None  # keep only events with weight >= this

    # Model and training (see ncf_stream.model.NeuMFConfig, ncf_stream.trainer.TrainerConfig)
    device: str = "auto"  # "auto": CUDA when available, else CPU
    factors: int = Field(32, ge=1)
    mlp_layers: list[int] = Field(default_factory=lambda: [64, 32, 16])
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(8192, ge=16)
    negatives: int = Field(4, ge=1)
    negative_alpha: float = Field(0.0, ge=0.0)
    lr: float = Field(0.02, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    tower_lr: float = Field(1e-3, gt=0)
    fresh_share: float = Field(0.5, gt=0, le=1)
    replay: bool = True
    min_history: int = Field(2, ge=1)
    seed: int = 0
    # Share of the trainer's time spent replaying while the stream is idle; the
    # rest is left to the servers on a small machine.
    replay_duty: float = Field(0.5, gt=0, le=1)

    # Snapshots and retrieval
    publish_every_s: float = Field(2.0, gt=0)
    publish_every_events: int = Field(50_000, ge=1)
    index_refresh_s: float = Field(30.0, gt=0)
    ivf_threshold: int = Field(200_000, ge=1)
    nprobe: int = Field(32, ge=1)
    candidates: int = Field(800, ge=1)
    max_k: int = Field(1000, ge=1)

    # Evaluation
    eval_interval_s: float = Field(60.0, gt=0)
    eval_max_users: int = Field(10_000, ge=0)
    eval_full: bool = True
    eval_full_max_pairs: int = Field(50_000_000, ge=1)  # full-catalogue ranking budget
    eval_duty: float = Field(0.05, gt=0, le=1)
    online_fraction: float = Field(0.01, ge=0, le=1)

    # Checkpoints (the only place the learning state survives a restart; None: none)
    checkpoint_dir: str | None = "checkpoints"
    checkpoint_every_s: float = Field(60.0, gt=0)
    checkpoint_keep: int = Field(3, ge=1)

    # Serving (loopback by default: exposing it is a deliberate act)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8080, ge=0, le=65535)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # also serve /metrics alone here
    shutdown_grace_s: float = Field(5.0, ge=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (flags) > environment > the TOML file, which load() passes as init
        # defaults through _toml_defaults; no .env file magic.
        return init_settings, env_settings

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Settings:
        """Build settings; ``flags`` with value None are treated as not given."""
        given = {k: v for k, v in flags.items() if v is not None}
        file_values = _read_toml(config_file, set(cls.model_fields)) if config_file else {}
        try:
            env_and_flags = cls(**given)
            merged = {**file_values, **env_and_flags.model_dump(exclude_unset=True)}
            return cls(**merged)
        except ValidationError as e:
            raise ConfigError(f"invalid settings: {e}") from None


def _read_toml(path: str | Path, fields: set[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in fields:
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    return flat
