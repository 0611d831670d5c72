"""``ncf-stream``: the command line, the top floor that wires the engine and Kafka."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from kafka.errors import KafkaError

from ncf_stream.errors import NcfStreamError
from ncf_stream.group import GroupError
from ncf_stream.readers import FORMATS
from ncf_stream.settings import SECTIONS, Settings, default, reference_markdown, toml_value
from ncf_stream.synth import SynthConfig

# The settings that have a flag, and the flag. The parsers, the loaders and the
# reference (docs/configuration.md) all read these; help texts come from Settings.
COMMON_FLAGS = {"kafka_bootstrap": "--bootstrap"}
SERVING_FLAGS = {"http_port": "--http-port", "grpc_port": "--grpc-port", "device": "--device"}
SNAPSHOT_FLAGS = {"snapshot_dir": "--snapshot-dir"}
INGEST_FLAGS = {"kafka_sources": "--kafka-sources"}  # the trainer's, not a replica's
FLAGS = {**COMMON_FLAGS, **SERVING_FLAGS, **SNAPSHOT_FLAGS, **INGEST_FLAGS}
# Keys of kafka_client_options whose values `ncf-stream config` does not print.
SECRET_WORDS = ("password", "secret", "token")


def _load(args: argparse.Namespace, **more: object) -> tuple[Settings, dict[str, str]]:
    """The settings, and where each came from; ``more``: values given as flags are."""
    given = {name: getattr(args, name) for name in FLAGS if hasattr(args, name)}
    return Settings.load_with_sources(args.config, **given, **more)


# torchrun's environment (torch.distributed.run) -> the group setting it gives.
TORCHRUN = {"WORLD_SIZE": "group_size", "RANK": "group_rank"}


def torchrun_group(sources: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The group settings a trainer started by torchrun takes from its environment
    (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT: all of them, or none is used), each
    one only where it has no value of its own (a flag, NCF_STREAM_GROUP_*, the file)."""
    names = [*TORCHRUN, "MASTER_ADDR", "MASTER_PORT"]
    if not all(environ.get(name) for name in names):
        return {}
    values = {setting: environ[name] for name, setting in TORCHRUN.items()}
    values["group_address"] = f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"
    return {name: value for name, value in values.items() if sources[name] == "default"}


def _settings(args: argparse.Namespace) -> Settings:
    return _load(args)[0]


def cmd_produce(args: argparse.Namespace) -> int:
    from consumers.produce import produce_file

    settings = _settings(args)
    topic = args.topic or settings.kafka_topic
    summary = produce_file(args.file, settings, topic=topic, fmt=args.format, rate=args.rate,
                           limit=args.limit, raw=args.raw, show_progress=not args.quiet)
    print(summary.describe(topic))
    return 1 if summary.failed else 0


def cmd_synth(args: argparse.Namespace) -> int:
    from ncf_stream.synth import SynthConfig, generate, write

    cfg = SynthConfig(users=args.users, items=args.items, events=args.events, seed=args.seed,
                      topics=args.topics)
    n = write(generate(cfg), args.out)
    print(f"wrote {n} events ({cfg.users} users, {cfg.items} items, seed {cfg.seed}) to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from consumers.demo import run_demo

    run_demo(_settings(args), events=args.events, rate=args.rate, seed=args.seed)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings, sources = _load(args)
    if args.workers > 1:  # it imports no torch: it only starts and watches the trainers
        from consumers.group_supervisor import Supervisor

        return Supervisor(settings, args.workers, args.argv).run()
    from consumers.daemon import Daemon, serve_until_signalled

    if torchrun := torchrun_group(sources, os.environ):
        settings = _load(args, **torchrun)[0]
    daemon = Daemon(settings)
    serve_until_signalled(daemon)
    return 0


def cmd_serve_replica(args: argparse.Namespace) -> int:
    import threading

    from ncf_stream.replica import Replica
    from ncf_stream.servers import stop_on_signals

    replica = Replica(_settings(args))
    stop = threading.Event()
    stop_on_signals(stop.set)
    s = replica.settings
    print(f"ncf-stream replica serving on http://{s.http_host}:{replica.http_port} (API "
          f"/v1/..., metrics /metrics) and gRPC {s.grpc_host}:{replica.grpc_port}; snapshots "
          f"from {s.snapshot_dir}", flush=True)
    replica.run(stop)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(reference_markdown(FLAGS), end="")
        return 0
    settings, sources = _load(args)
    print("# The effective settings, as TOML, each with where its value came from.")
    for name in Settings.model_fields:
        if name in SECTIONS:
            print(f"\n# ---- {SECTIONS[name]}")
        value = _hide_secrets(getattr(settings, name))
        line = f"# {name} unset" if value is None else f"{name} = {toml_value(value)}"
        source = f"flag {FLAGS[name]}" if sources[name] == "flag" else sources[name]
        print(f"{line:<40}  # {source}")
    return 0


def _hide_secrets(value: object) -> object:
    if not isinstance(value, dict):
        return value
    return {k: "(hidden)" if any(w in k.lower() for w in SECRET_WORDS) else v
            for k, v in value.items()}


def _setting_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """One flag per setting: type, and help with the default, from its declaration."""
    for name, flag in flags.items():
        info = Settings.model_fields[name]
        kind: type = int if info.annotation is int else float if info.annotation is float else str
        summary = (info.description or name).split(". ")[0].rstrip(".")
        parser.add_argument(flag, dest=name, type=kind,
                            help=f"{summary} (default {toml_value(default(name))})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncf-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", help="TOML settings file")
    common = argparse.ArgumentParser(add_help=False, parents=[config])
    _setting_flags(common, COMMON_FLAGS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("produce", parents=[common], help="publish a ratings file to Kafka")
    p.add_argument("file")
    p.add_argument("--topic", help="target topic (default: the configured one, interactions)")
    p.add_argument("--format", choices=FORMATS, help="file format (default: by extension)")
    p.add_argument("--rate", type=_positive_float, help="events per second (default: unlimited)")
    p.add_argument("--limit", type=_positive_int, help="publish only the first N events")
    p.add_argument("--raw", action="store_true",
                   help="send each line as is, in file order, unvalidated "
                   "(replays captured streams)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("synth", help="write a seeded synthetic stream with planted structure")
    synth = SynthConfig()
    p.add_argument("--users", type=_positive_int, default=synth.users)
    p.add_argument("--items", type=_positive_int, default=synth.items)
    p.add_argument("--events", type=_positive_int, default=synth.events)
    p.add_argument("--topics", type=_positive_int, default=synth.topics,
                   help="planted item clusters")
    p.add_argument("--seed", type=int, default=synth.seed)
    p.add_argument("--out", required=True, help="output file: .csv or .jsonl")
    p.set_defaults(func=cmd_synth)

    serving = argparse.ArgumentParser(add_help=False)
    _setting_flags(serving, SERVING_FLAGS)
    _setting_flags(serving, SNAPSHOT_FLAGS)
    ingest = argparse.ArgumentParser(add_help=False)  # serve, demo, config: not replicas
    _setting_flags(ingest, INGEST_FLAGS)

    p = sub.add_parser("serve", parents=[common, serving, ingest],
                       help="run the daemon: consume, train, evaluate, serve HTTP and gRPC "
                            "(and export snapshots to --snapshot-dir for replicas)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="run a group of N trainers over the topic's partitions, each a "
                        "process of its own, restarted together when one fails; trainer r "
                        "serves on the ports given plus r (default 1: this process alone)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("serve-replica", parents=[config, serving],
                       help="serve HTTP and gRPC from the snapshots a trainer exports to "
                            "--snapshot-dir (no Kafka, no training)")
    p.set_defaults(func=cmd_serve_replica)

    p = sub.add_parser("demo", parents=[common, serving, ingest],
                       help="the daemon on a local broker (started if none runs) with a "
                            "synthetic demo stream")
    p.add_argument("--events", type=_positive_int, default=1_000_000,
                   help="synthetic events to publish (default %(default)s)")
    p.add_argument("--rate", type=_positive_float, default=2_000.0,
                   help="events per second (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("config", parents=[common, serving, ingest],
                       help="print the effective settings and where each came from "
                            "(default, file, env, flag)")
    p.add_argument("--markdown", action="store_true",
                   help="print instead the reference of every setting (docs/configuration.md)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # serve --workers runs each trainer with the same arguments
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kafka-python logs transient states (a topic being auto-created) as errors;
        # real failures reach us as exceptions.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except GroupError as e:  # not the settings: the group must be started again as a whole
        print(f"ncf-stream: group error: {e}", file=sys.stderr)
        return 3
    except (NcfStreamError, OSError) as e:
        print(f"ncf-stream: error: {e}", file=sys.stderr)
        return 2
    except KafkaError as e:
        print(f"ncf-stream: Kafka error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
