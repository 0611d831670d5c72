"""One settings object: defaults < TOML file < ``NCF_STREAM_*`` environment < flags.

Fields are flat (``kafka_bootstrap``) so that each has exactly one environment
name (``NCF_STREAM_KAFKA_BOOTSTRAP``); a TOML file may group them in tables,
``[kafka] bootstrap = "..."`` being ``kafka_bootstrap``.

Each knob is declared once, here: its default, its bounds and, in its
description, why it has that default. Everything else reads the declaration:

* the engine's dataclass configs (``TrainerConfig``, ``NeuMFConfig``, ...) declare a
  shared field as ``batch_size: int = setting("batch_size")``: its default is this
  one, :func:`check_config` holds it to these bounds, and :func:`config_values`
  copies it from a ``Settings`` (each config's ``from_settings``);
* plain defaults elsewhere are ``default("name")``;
* ``ncf-stream config --markdown`` renders :func:`reference_markdown`, which is
  ``docs/configuration.md`` (a test fails when that file differs from it).

A config field a user has no reason to set stays declared in its dataclass alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types as at
from pydantic import Field, GetCoreSchemaHandler, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import core_schema
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ncf_stream.errors import ConfigError
from ncf_stream.threads import BackgroundPolicy

ENV_PREFIX = "NCF_STREAM_"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A bound ``annotated_types`` cannot state: ``test`` checks it, ``text`` documents it."""

    text: str
    test: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def check(value: Any) -> Any:
            if not self.test(value):
                raise ValueError(f"must be {self.text}")
            return value

        return core_schema.no_info_after_validator_function(check, handler(source))


def _tower_widths(layers: tuple[int, ...]) -> bool:
    return len(layers) > 0 and min(layers) >= 1 and layers[0] % 2 == 0


MlpLayers = Annotated[tuple[int, ...], Rule(
    "widths >= 1, the first even (it is the [user ; item] halves)", _tower_widths)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # ---- Kafka (ARCHITECTURE.md, "Kafka defaults") -------------------------------------------
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092", min_length=1,
        description="Kafka bootstrap servers, host:port[,host:port...].")
    kafka_topic: str = Field(
        "interactions", min_length=1, description="The topic interaction events are read from.")
    kafka_dlq_topic: str = Field(
        "interactions.dlq", min_length=1,
        description="Dead-letter topic: every record that breaks the event contract goes here "
                    "with its reason; the daemon never stops for one.")
    dead_letter_undecodable: bool = Field(
        False,
        description="A batch the Kafka client cannot decode (a codec it lacks, a corrupt "
                    "batch) stops its partition while the others flow on, until an operator "
                    "acts. true dead-letters its offset range instead (one letter naming the "
                    "range and the reason) and moves on: those events never reach the model.")
    kafka_group_id: str = Field(
        "ncf-stream", min_length=1,
        description="Consumer group. Offsets are committed only after a checkpoint covers them.")
    kafka_max_poll_records: int = Field(
        8192, ge=1, description="Records per poll: one micro-batch worth of events.")
    kafka_poll_timeout_s: float = Field(
        0.2, gt=0, description="How long a poll waits for records when nothing is pending.")
    kafka_client_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to kafka-python as is: security_protocol, sasl_mechanism, "
                    "sasl_plain_username, ssl_cafile, ... (see kafka-python's KafkaConsumer).")
    kafka_source_process: bool = Field(
        True,
        description="Run the consumer and the decoder in a process of their own "
                    "(consumers.source_process): their pure-Python record parsing then never "
                    "holds the GIL that requests need. false keeps them on the trainer thread.")
    kafka_sources: int = Field(
        1, ge=1,
        description="Source processes, each a member of the consumer group with the "
                    "topic's partitions split among them (consumers.parallel_source). One "
                    "kafka-python consumer tops out at a few hundred thousand events/s, which "
                    "a GPU trainer can outrun; more need the cores to run on and at least as "
                    "many partitions (extra members sit idle). Above 1 the engine maps ids "
                    "itself, on its GIL (docs/operations.md). Above 1 implies "
                    "kafka_source_process.")
    kafka_group_instance_id: str = Field(
        "",
        description="Static group membership (KIP-345): a consumer that joins with the id of "
                    "one that died takes over its partitions at once, instead of waiting out its "
                    "session. Empty: the daemon uses one id per process, so a rebuilt source "
                    "process resumes at once; set a stable id per daemon (a pod's name) and a "
                    "restarted daemon does too. Two live daemons must never share one.")
    kafka_session_timeout_s: float = Field(
        10.0, ge=1,
        description="How long a daemon that died (kill -9, a lost machine) keeps its "
                    "partitions before its group hands them on: a restarted daemon waits up to "
                    "this long to consume. The broker's group.min.session.timeout.ms (6 s by "
                    "default) bounds it from below.")
    source_stall_s: float = Field(
        30.0, gt=0,
        description="A source process that has not answered a poll for this long past its "
                    "timeout is wedged (spinning or hung inside the client): it is killed and "
                    "rebuilt while serving goes on. An idle stream is not a stall: the child "
                    "answers every poll, with or without records.")
    background_policy: BackgroundPolicy = Field(
        "idle",
        description="How the trainer, the source's decoder and the evaluator yield the CPU to "
                    "requests: idle is SCHED_IDLE (Linux; they run only when nothing else wants "
                    "a core), nice is nice 19.")

    # ---- Event contract ------------------------------------------------------------------------
    max_record_bytes: int = Field(
        4096, ge=64,
        description="Larger records are dead-lettered as oversize_record. A valid event is "
                    "~100 bytes; 4 KiB leaves room for extra fields while keeping one hostile "
                    "record from costing the decoder megabytes.")
    event_types: list[str] | None = Field(
        None, description="Keep only events of these types (others count as skipped, not bad); "
                          "unset keeps all.")
    min_weight: float | None = Field(
        None, description="Keep only events with weight >= this; unset keeps all.")

    # ---- Model and training (ncf_stream.model.NeuMFConfig, ncf_stream.trainer.TrainerConfig) ---
    device: str = Field(
        "auto", min_length=1,
        description="auto: CUDA when available, else CPU; or a torch device (cpu, cuda, cuda:1).")
    device_step: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The device-resident training step (ncf_stream.device_step): the positives "
                    "the store has released to training are mirrored on the trainer's device "
                    "as sorted keys, and the step draws fresh positives, replay and negatives "
                    "there, so a CUDA step never waits on the host or reads anything back; "
                    "the host hands over new events in whole batches. Negatives stay exact "
                    "(never an item the user trained on); one a user cannot get in a fixed "
                    "number of draws is left out and counted. auto: on for CUDA with "
                    "history_length 0, off otherwise (on the CPU the host step, which draws "
                    "from the store itself, costs no copy). on with history_length > 0 is an "
                    "error: the history input still needs the host.")
    factors: int = Field(
        32, ge=1,
        description="GMF predictive factors: the paper's model (its best on MovieLens was 32 "
                    "to 64). On a validation split of ml-latest-small, bench/quality.py --select "
                    "chose 256 with sampled softmax, 8 negatives and the history input "
                    "(bench/chosen.json, deploy/quality.toml), which beat or tied every "
                    "baseline on the test split (docs/benchmarks.md, Quality); the defaults "
                    "stay the paper's model, which trains about twice as fast.")
    mlp_layers: MlpLayers = Field(
        (64, 32, 16),
        description="MLP tower widths; the first is the concatenated [user ; item] embedding, "
                    "so each MLP embedding has mlp_layers[0] / 2 columns. The paper's tower "
                    "halves each layer and ends at the predictive factors / 2 for factors 32: "
                    "64-32-16.")
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout in the MLP tower. The stream sees an example a handful of times, "
                    "too few for dropout to pay (0.2 did worse in an older sweep, not yet "
                    "repeated on the validation split). Kept as a knob.")
    history_length: int = Field(
        0, ge=0, le=1024,
        description="The history input (ncf_stream.history): each user's row is joined by "
                    "the decayed mean of context embeddings of their history_length most "
                    "recent trained items; in training, each positive sees only the items "
                    "before it. On ml-latest-small's validation split it lifted full "
                    "NDCG@10 from 0.026 to 0.043 at 20 (3 seeds), for 20% of step time and "
                    "12 bytes per user and slot. 0: the paper's NeuMF, a user known by one row.")
    history_decay: float = Field(
        0.9, gt=0, le=1,
        description="Weight of the k-th most recent item in the history input: decay^k "
                    "(1: a plain mean). Validation: 0.7-0.9 within noise of each other.")
    batch_size: int = Field(
        8192, ge=16, description="Samples (positives + negatives) per training step.")
    negatives: int = Field(
        4, ge=1, description="Sampled negatives per positive; the paper found 3 to 6 best.")
    negative_alpha: float = Field(
        0.0, ge=0.0,
        description="Negative sampling: 0 uniform, 0.75 word2vec's smoothed popularity "
                    "(count^alpha).")
    loss: Literal["bce", "softmax"] = Field(
        "bce",
        description="bce: the paper's binary cross-entropy, each positive and negative on its "
                    "own. softmax: each positive against its own negatives, logits corrected "
                    "by -log q of the draw distribution (sampled softmax).")
    optimizer: Literal["adagrad", "adam"] = Field(
        "adagrad",
        description="For the embedding rows: adagrad (RowAdagrad) or adam (lazy Adam); both "
                    "update only the rows a step touched.")
    lr: float = Field(
        0.02, gt=0,
        description="Step size for the embedding rows (validation chose 0.05 with factors 64: "
                    "see factors).")
    weight_decay: float = Field(0.0, ge=0, description="Lazy L2 on the rows a step touched.")
    tower_lr: float = Field(1e-3, gt=0, description="Adam on the MLP tower and output layer.")
    fresh_share: float = Field(
        0.5, gt=0, le=1,
        description="At most this share of a step's positives are fresh; replay from the store "
                    "fills the rest.")
    replay: bool = Field(
        True,
        description="Replay positives from the store, so the model keeps learning between "
                    "bursts and does not forget; a step with no fresh events is all replay.")
    replay_ratio: float | None = Field(
        None, ge=0,
        description="Replay budget: replayed samples stop at this multiple of the fresh "
                    "samples trained, and new events earn more. A stream that goes quiet is "
                    "then not relearned without end, which overfits: at the quality profile "
                    "on 10k synthetic users, full HR@10 fell from 0.46 after 6M samples to "
                    "0.34 after 23M (docs/benchmarks.md). None replays whenever idle.")
    min_history: int = Field(
        2, ge=1,
        description="Users with fewer interactions have no hold-out (their newest interaction "
                    "is held out for evaluation, not trained on).")
    retention_s: float | None = Field(
        None, gt=0,
        description="Retention: interactions whose last event is older than this many "
                    "seconds before the newest event time are dropped from the store (a sweep "
                    "every eighth of it), so its memory follows the traffic inside the window, "
                    "not all history. Unset keeps everything: the model learns from all of a "
                    "user's history, and how long is a product decision (docs/operations.md).")
    holdout_fraction: float = Field(
        0.1, gt=0, le=1,
        description="Share of users, picked by a hash of their id (the same users on every "
                    "run), who have a rolling hold-out. A held-out event waits for the user's "
                    "next one before it trains, and the newest event is what an online model "
                    "should react to at once, so most users should not pay for measurement. "
                    "0.1 keeps 10k hold-outs from 100k users, more than an evaluation uses "
                    "(eval_users); raise it for small populations, 1.0 for benchmarks.")
    seed: int = Field(
        0, description="Seeds initialisation, negative sampling, replay, the evaluation samples "
                       "and the online hit rate's probes.")
    replay_duty: float = Field(
        0.4, gt=0, le=1,
        description="Share of wall time the trainer spends replaying (its own CPU) while the "
                    "stream is idle; it rests inside the source's poll for the rest, so new "
                    "events wake it. Replay costs query latency: at 100 qps on 2 cores the idle "
                    "p99 was 7.4-8.0 ms at 0.3, 7.6 at 0.4 and 9.8-14.5 at 0.5 (bench/idle.py).")
    max_pending_positives: int = Field(
        8192, ge=1,
        description="How far ingest may run ahead of training: with this many fresh positives "
                    "waiting, the engine stops polling until training catches up, so a backlog "
                    "waits in Kafka (and shows as consumer lag). Kept near one poll, each "
                    "positive trains against the store as it stood at its own time: the user's "
                    "items and the popularity its negatives are drawn by. Run ahead (2M), a "
                    "backlog trained against its own future: full HR@10 0.371 against 0.417 on "
                    "10k synthetic users (docs/benchmarks.md, Through the daemon). Raise it to "
                    "let a backlog reach the store (seen items, history) faster than the model "
                    "learns it; each waiting positive takes about 16 bytes.")
    trainer_threads: int | None = Field(
        None, ge=1,
        description="torch threads of the training thread; none: one per usable core but one, "
                    "left to requests (a request preempting one thread of the SCHED_IDLE team "
                    "stalls all of it). Readers (requests, evaluation) compute single-threaded.")

    # ---- Snapshots and retrieval ---------------------------------------------------------------
    publish_every_s: float = Field(
        2.0, gt=0, description="Publish a snapshot to the readers at least this often.")
    publish_every_events: int = Field(
        50_000, ge=1,
        description="Also publish after this many consumed events, if that comes sooner.")
    index_refresh_s: float = Field(
        30.0, gt=0,
        description="An IVF index is rebuilt in the background this often and reused until the "
                    "new one is ready (a flat one is rebuilt with every snapshot).")
    ivf_threshold: int = Field(
        200_000, ge=1,
        description="Flat (exact) search costs O(items) per query: ~3 ms at 1M items x 32 dims "
                    "on one core, so flat serves up to this many items; IVF takes over above "
                    "it.")
    retrieval_backend: Literal["auto", "faiss", "torch"] = Field(
        "auto",
        description="What searches the candidate index. faiss: a FAISS index (flat below "
                    "ivf_threshold, IVF above), on the GPU when faiss-gpu and CUDA are both "
                    "present (a k above faiss-gpu's limit of 2048, a user with many seen items, "
                    "is searched on its CPU copy). torch: the exact inner-product top-k as "
                    "torch matrix products, on CUDA when torch sees a GPU, else on the CPU: no "
                    "extra wheel, no IVF recall loss, O(items) per query. auto: FAISS on the "
                    "GPU when faiss-gpu sees one; torch when CUDA is there but faiss-gpu is "
                    "not (pip's faiss is faiss-cpu, and a CPU index beside a GPU model leaves "
                    "retrieval on the busy host); else FAISS on the CPU, where IVF is "
                    "sub-linear. GPU timings of the two: not yet measured "
                    "(docs/benchmarks.md).")
    nprobe: int = Field(
        256, ge=1,
        description="IVF lists probed per query (of ~4 sqrt(items)): probes trade recall for "
                    "time. At 1M items on a converged model of the defaults, 256 finds 0.97 of "
                    "the exact top 10 for about 1 ms per query (128: 0.94, 32: 0.78); the "
                    "quality profile's wider vectors need more (256: 0.93, 512: 0.99; "
                    "deploy/quality.toml sets 512; docs/benchmarks.md).")
    candidates: int = Field(
        800, ge=1,
        description="Candidates retrieved from the index and rescored by the full NeuMF, for "
                    "catalogues above exact_items (bench/retrieval.py: recall@10 0.99 at 10k "
                    "items, 0.86 at 100k, 0.97 at 200k; 3200 gives 0.98 at 100k for about "
                    "twice the query time).")
    exact_items: int = Field(
        20_000, ge=0,
        description="Catalogues up to this many items are ranked exactly: every item scored "
                    "by the full NeuMF (each item's first-layer half cached per snapshot), "
                    "recall 1 by construction. Alone it costs ~0.025 ms per 1k items "
                    "(bench/retrieval.py: 0.35-0.46 ms p50 at 10k, 2.5 ms at 100k, against "
                    "0.5 and 1.3 ms for candidates at 800); under ingest on 2 cores "
                    "(bench/load.py --quick) it matched the candidate path's p99 at 20k items "
                    "(11.6-12.0 against 12.1 ms) and blew up at 100k (p99 0.5-2.9 s). Larger "
                    "catalogues are served from index candidates. 0: always candidates.")
    max_k: int = Field(1000, ge=1, description="The largest k a request may ask for.")
    popular_window_s: float = Field(
        86_400.0, gt=0,
        description="GET /v1/popular counts interactions over this many seconds of event "
                    "time before the newest event, in steps of 1/24 of it. A day: it spans "
                    "one daily cycle, so what is popular does not swing between day and night, "
                    "yet today's items outrank last week's.")

    # ---- Anonymous requests (ncf_stream.anonymous) -------------------------------------------
    anonymous_steps: int = Field(
        10, ge=0, le=200,
        description="POST /v1/recommend with items instead of a user fits a temporary user row "
                    "to them in this many Adagrad steps (each a forward and backward pass over "
                    "the items and their negatives) against the frozen snapshot. On a planted "
                    "6-topic model, 10 steps at lr 0.3 put 45% of the answer in the session's "
                    "topic (chance 17%, popularity 0%); on ml-latest-small's validation split "
                    "(bench/quality_anonymous.py --defaults) every point tried from 0 to 10 "
                    "steps was within noise of the others on full HR@10 (0.028-0.031), and a "
                    "fit lifted sampled HR@10 from 0.56 to 0.61-0.63. 0: no fit; the row is "
                    "the start row plus the history input, which the quality profile chose.")
    anonymous_lr: float = Field(
        0.3, gt=0,
        description="Adagrad step size of the anonymous fit: on the planted model 0.1 "
                    "recovered too little of the topic in 10 steps (28%), 0.3 45%, 1.0 50%; "
                    "on ml-latest-small 0.03-0.3 were within noise of each other.")
    anonymous_negatives: int = Field(
        4, ge=1, le=32,
        description="Negatives per given item in the anonymous fit, drawn from the catalogue "
                    "less the given items as the trainer draws them (negative_alpha), seeded "
                    "by the items (the same items get the same answer). 4: the paper's and "
                    "the trainer's default.")
    anonymous_init: Literal["zeros", "mean"] = Field(
        "zeros",
        description="Where the anonymous row starts: zeros, or the snapshot's mean user row. "
                    "Within noise of each other on ml-latest-small's validation split at both "
                    "the defaults and the quality profile (docs/benchmarks.md, Anonymous "
                    "requests); zeros was better on the planted model (45% against 32% of the "
                    "topic at the defaults) and needs nothing from the snapshot.")

    # ---- Evaluation -----------------------------------------------------------------------------
    eval_interval_s: float = Field(
        60.0, gt=0, description="Seconds between periodic evaluations.")
    eval_max_users: int = Field(
        10_000, ge=0,
        description="Hold-outs ranked per evaluation: a seeded sample bounds the cost; 0 "
                    "ranks every hold-out.")
    eval_full: bool = Field(
        True, description="Also rank against the whole catalogue, not only the sampled negatives.")
    eval_full_max_pairs: int = Field(
        50_000_000, ge=1,
        description="Exact full-catalogue ranking costs a forward pass per (user, item): ~4M "
                    "pairs/s on 2 CPU cores. It runs on the first users of the same sample that "
                    "fit this budget (100k items: 500 users), so an evaluation stays within "
                    "seconds.")
    eval_duty: float = Field(
        0.05, gt=0, le=1,
        description="At most this share of wall time computing, the rest asleep. Training "
                    "holds both cores of a small machine; 0.05 keeps it at >= 90% of its rate "
                    "while an evaluation runs (bench/eval.py). Evaluations take longer in wall "
                    "time instead.")
    online_fraction: float = Field(
        0.01, ge=0, le=1,
        description="Share of incoming events probed, before training on them, for the online "
                    "hit rate (was the item in the user's served top K?).")

    # ---- Checkpoints -----------------------------------------------------------------------------
    checkpoint_dir: str | None = Field(
        "checkpoints",
        description="Where checkpoints go: the only place the learning state survives a "
                    "restart. Empty or unset: no checkpoints.")
    checkpoint_every_s: float = Field(
        60.0, gt=0,
        description="Seconds between checkpoints (and one at shutdown); after a crash the "
                    "events since the last one are consumed again.")
    checkpoint_keep: int = Field(3, ge=1, description="Checkpoints kept; older ones are deleted.")

    # ---- Serving (loopback by default: exposing it is a deliberate act) ------------------------
    http_host: str = Field("127.0.0.1", description="HTTP address; loopback by default.")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free one.")
    grpc_host: str = Field("127.0.0.1", description="gRPC address; loopback by default.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535,
        description="Also serve /metrics alone on this port; unset: only on the HTTP port.")
    admin_token: Annotated[SecretStr | None, Rule(
        "16 characters or more", lambda v: v is None or len(v.get_secret_value()) >= 16,
    )] = Field(
        None,
        description="Bearer token of the admin endpoints (DELETE /v1/admin/users/{user} and "
                    "/items/{item}, gRPC DeleteUser / DeleteItem). Unset turns them off (404): "
                    "deleting is off until an operator chooses a secret. 16 characters at "
                    "least, so that it cannot be guessed; set it through the environment, not "
                    "a flag (flags show in ps).")
    shutdown_grace_s: float = Field(
        5.0, ge=0, description="How long the servers finish in-flight requests at shutdown.")

    # ---- Snapshot export and serving replicas (docs/operations.md, "Serving replicas") ------
    snapshot_dir: str | None = Field(
        None,
        description="The trainer (ncf-stream serve) exports its published snapshots here, and "
                    "ncf-stream serve-replica serves them from here. On one machine put it on "
                    "/dev/shm (memory, no disk writes); across machines a shared directory. "
                    "Empty or unset: no export.")
    snapshot_export_every_s: float = Field(
        1.0, gt=0,
        description="Export the newest published snapshot at most this often. An export is "
                    "written off the training thread; one still running when the next is due "
                    "makes that one wait, and snapshots published meanwhile are skipped but "
                    "the newest. 1 s keeps replicas within about a publish interval "
                    "(publish_every_s) plus a second of the trainer.")
    replica_stale_s: float = Field(
        60.0, gt=0,
        description="A replica whose snapshot is older than this reports ingest degraded: "
                    "the trainer publishes every publish_every_s while it trains, replay "
                    "included, so an old snapshot means the trainer or its export stopped "
                    "(with replay_ratio set, a quiet stream stops publishing too).")

    # ---- A group of trainers over the topic's partitions (docs/group.md) -------------------
    group_size: int = Field(
        1, ge=1,
        description="Trainer processes in the group. 1: this daemon owns every partition. "
                    "Above 1, each owns the partitions p with p % group_size == group_rank and "
                    "their users; item rows and the tower are kept in step over "
                    "torch.distributed (ncf_stream.group). Set by ncf-stream serve --workers N, "
                    "or from torchrun's WORLD_SIZE.")
    group_rank: int = Field(
        0, ge=0,
        description="This trainer's rank in the group, below group_size. Set by ncf-stream "
                    "serve --workers N, or from torchrun's RANK.")
    group_address: str = Field(
        "127.0.0.1:29500", min_length=1,
        description="host:port of rank 0's rendezvous (torch.distributed's TCP store), where "
                    "the group forms; from torchrun's MASTER_ADDR and MASTER_PORT when set.")
    group_sync_every_steps: int = Field(
        8, ge=1,
        description="The group exchanges the item rows and tower updates each trainer made "
                    "after this many of its training steps (or group_sync_every_s, whichever "
                    "comes first). Fewer steps between exchanges lose less to stale shared "
                    "rows and spend more time exchanging: on 10k synthetic users, 2 trainers "
                    "on 2 cores, 16 steps lost about 0.01 sampled HR@10 against 4 or 8; at "
                    "8, two trainers were within 0.01 of one (0.835 against 0.832, 3 seeds) "
                    "with 17% of their time in exchanges (bench/scale.py, docs/group.md).")
    group_sync_every_s: float = Field(
        0.2, gt=0,
        description="At most this long between two exchanges of the group, however few "
                    "steps were taken: an event with an item new to the group waits for the "
                    "next exchange (which gives the item its row), so this bounds that wait.")
    group_timeout_s: float = Field(
        60.0, gt=0,
        description="How long a collective waits for the other trainers. A trainer that "
                    "is gone fails the group: the others stop training (serving goes on) and "
                    "exit, and ncf-stream serve --workers N restarts the group from its last "
                    "aligned checkpoint.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (flags) > environment; load() merges the TOML file in below the
        # environment. No .env file magic.
        return init_settings, env_settings

    @classmethod
    def load(cls, config_file: str | Path | None = None, **flags: Any) -> Settings:
        """Build settings; ``flags`` with value None are treated as not given."""
        return cls.load_with_sources(config_file, **flags)[0]

    @classmethod
    def load_with_sources(cls, config_file: str | Path | None = None,
                          **flags: Any) -> tuple[Settings, dict[str, str]]:
        """:meth:`load`, and where each value came from: ``default``, ``file PATH``,
        ``env NCF_STREAM_X`` or ``flag``."""
        given = {k: v for k, v in flags.items() if v is not None}
        file_values = _read_toml(config_file, set(cls.model_fields)) if config_file else {}
        try:
            env_and_flags = cls(**given)
            merged = {**file_values, **env_and_flags.model_dump(exclude_unset=True)}
            settings = cls(**merged)
        except ValidationError as e:
            raise ConfigError(f"invalid settings: {_redacted(e)}") from None
        sources = {}
        for name in cls.model_fields:
            if name in given:
                sources[name] = "flag"
            elif name in env_and_flags.model_fields_set:
                sources[name] = f"env {env_name(name)}"
            elif name in file_values:
                sources[name] = f"file {config_file}"
            else:
                sources[name] = "default"
        return settings, sources


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


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


# ---- the declarations, read by the rest of the code base ------------------------------------

SETTING = "ncf_stream.setting"  # dataclass field metadata key: the Settings field it mirrors


def _info(name: str) -> FieldInfo:
    try:
        return Settings.model_fields[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a setting (ncf_stream.settings.Settings)") from None


def default(name: str) -> Any:
    """The declared default of setting ``name``."""
    return _info(name).get_default(call_default_factory=True)


def setting(name: str) -> Any:
    """A dataclass field that mirrors setting ``name``: its default, and (through
    :func:`check_config`, called in ``__post_init__``) its bounds."""
    info = _info(name)
    metadata = {SETTING: name}
    if info.default_factory is not None:
        return dataclasses.field(default_factory=info.default_factory,  # type: ignore[arg-type]
                                 metadata=metadata)
    return dataclasses.field(default=info.default, metadata=metadata)


def shared_fields(cls: type) -> dict[str, str]:
    """{dataclass field: the setting it mirrors} of a config class."""
    return {f.name: f.metadata[SETTING] for f in dataclasses.fields(cls) if SETTING in f.metadata}


def check(name: str, value: Any, where: str | None = None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is within setting ``name``'s bounds."""
    _info(name)
    try:
        Settings.__pydantic_validator__.validate_assignment(Settings.model_construct(), name,
                                                            value)
    except ValidationError as e:
        why = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ConfigError(f"{where or name} = {value!r}: {why} (declared by setting {name})"
                          ) from None


SECRETS = frozenset({"admin_token"})  # never echoed, even when invalid


def _redacted(e: ValidationError) -> str:
    """The errors, without the input values when a secret is among them (pydantic's
    message quotes every input, and an operator's mistyped token is still a secret)."""
    if not any(err["loc"] and err["loc"][0] in SECRETS for err in e.errors()):
        return str(e)
    return "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                     for err in e.errors(include_input=False, include_url=False))


def check_config(config: Any) -> None:
    """Hold each of a dataclass config's shared fields to its setting's bounds."""
    for field_name, name in shared_fields(type(config)).items():
        check(name, getattr(config, field_name), f"{type(config).__name__}.{field_name}")


def check_group(settings: Settings) -> None:
    """The group settings against each other and the source's; ConfigError if they clash.

    A function the daemon (and ncf-stream serve --workers) calls, not a validator of
    Settings: load_with_sources builds Settings from the flags and environment alone
    before it merges the file in, and check() validates one field against defaults, so
    a validator would see a rank from one place against a size from none."""
    if settings.group_rank >= settings.group_size:
        raise ConfigError(f"group_rank = {settings.group_rank} with group_size = "
                          f"{settings.group_size}: the ranks of a group are 0 to "
                          f"{settings.group_size - 1}")
    if settings.group_size > 1 and settings.kafka_sources > 1:
        raise ConfigError(f"kafka_sources = {settings.kafka_sources} with group_size = "
                          f"{settings.group_size}: a trainer of a group reads its partitions "
                          "through one source (they are its own by rank, not split by a "
                          "consumer group); for more ingest run more trainers (a larger "
                          "group_size, ncf-stream serve --workers N)")


C = TypeVar("C")


def config_values(cls: type[C], settings: Settings) -> dict[str, Any]:
    """The keyword arguments that set a config class's shared fields from ``settings``."""
    return {field_name: getattr(settings, name)
            for field_name, name in shared_fields(cls).items()}


# ---- documentation, generated from the declarations ---------------------------------------------

# The reference's sections: the setting each one starts with.
SECTIONS: Mapping[str, str] = {
    "kafka_bootstrap": "Kafka",
    "max_record_bytes": "Event contract",
    "device": "Model and training",
    "publish_every_s": "Snapshots and retrieval",
    "anonymous_steps": "Anonymous requests",
    "eval_interval_s": "Evaluation",
    "checkpoint_dir": "Checkpoints",
    "http_host": "Serving",
    "snapshot_dir": "Snapshot export and replicas",
    "group_size": "A group of trainers",
}

_BOUNDS: tuple[tuple[type, str, str], ...] = (
    (at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def bounds_text(name: str) -> str:
    """Setting ``name``'s bounds in words, as declared: ``>= 16``, ``one of adagrad, adam``."""
    info = _info(name)
    parts = []
    for meta in info.metadata:
        for kind, attr, op in _BOUNDS:
            if isinstance(meta, kind):
                parts.append(f"{op} {toml_value(getattr(meta, attr))}")
        if isinstance(meta, at.MinLen):
            parts.append("not empty" if meta.min_length == 1 else f"length >= {meta.min_length}")
        if isinstance(meta, Rule):
            parts.append(meta.text)
    if get_origin(info.annotation) is Literal:
        parts.append("one of " + ", ".join(str(a) for a in get_args(info.annotation)))
    return ", ".join(parts)


def toml_value(value: Any) -> str:
    """``value`` as TOML writes it (None, which TOML cannot write, as ``unset``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 and value % 1000 == 0 else str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value).replace("infinity", "inf")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown(flags: Mapping[str, str] | None = None) -> str:
    """The settings reference (docs/configuration.md): one table row per declaration.
    ``flags``: {setting: the command-line flag that sets it}."""
    flags = flags or {}
    lines = [
        "# Configuration reference",
        "",
        "Generated by `ncf-stream config --markdown` from the declarations in",
        "`ncf_stream/settings.py`; edit those, then regenerate this file "
        "(`tests/test_settings.py` fails while it differs).",
        "",
        "Precedence: defaults < TOML file (`--config FILE`) < environment "
        f"(`{ENV_PREFIX}<SETTING>`) < flags.",
        "A TOML table groups settings by prefix: `[kafka] topic = \"...\"` is `kafka_topic`.",
        "Lists and tables in the environment are JSON: "
        f"`{env_name('mlp_layers')}='[64, 32, 16]'`.",
        "`ncf-stream config [--config FILE]` prints each effective value and where it came from.",
    ]
    header = ["", "| setting | environment | flag | default | bounds | description |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name, info in Settings.model_fields.items():
        if name in SECTIONS:
            lines += ["", f"## {SECTIONS[name]}", *header]
        flag = f"`{flags[name]}`" if name in flags else ""
        lines.append(
            f"| `{name}` | `{env_name(name)}` | {flag} | `{_cell(toml_value(default(name)))}` "
            f"| {_cell(bounds_text(name))} | {_cell(info.description or '')} |")
    return "\n".join(lines) + "\n"
