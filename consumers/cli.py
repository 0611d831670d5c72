"""``ncf-stream``: the command line, the top floor that wires the engine and Kafka."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from kafka.errors import KafkaError

from ncf_stream.errors import NcfStreamError
from ncf_stream.readers import FORMATS
from ncf_stream.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(args.config, kafka_bootstrap=args.bootstrap)


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

    run_demo(_serve_settings(args), events=args.events, rate=args.rate, seed=args.seed)
    return 0


def _serve_settings(args: argparse.Namespace) -> Settings:
    return Settings.load(args.config, kafka_bootstrap=args.bootstrap, http_port=args.http_port,
                         grpc_port=args.grpc_port, device=args.device)


def cmd_serve(args: argparse.Namespace) -> int:
    from consumers.daemon import Daemon, serve_until_signalled

    daemon = Daemon(_serve_settings(args))
    serve_until_signalled(daemon)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncf-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML settings file")
    common.add_argument("--bootstrap", help="Kafka bootstrap servers (default 127.0.0.1:9092)")
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
    p.add_argument("--users", type=_positive_int, default=1000)
    p.add_argument("--items", type=_positive_int, default=500)
    p.add_argument("--events", type=_positive_int, default=20_000)
    p.add_argument("--topics", type=_positive_int, default=20, help="planted item clusters")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output file: .csv or .jsonl")
    p.set_defaults(func=cmd_synth)

    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--http-port", type=int, help="HTTP port (default 8080)")
    serving.add_argument("--grpc-port", type=int, help="gRPC port (default 50051)")
    serving.add_argument("--device", help="auto (default), cpu or cuda")

    p = sub.add_parser("serve", parents=[common, serving],
                       help="run the daemon: consume, train, evaluate, serve HTTP and gRPC")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", parents=[common, serving],
                       help="the daemon on a local broker (started if none runs) with a "
                            "synthetic demo stream")
    p.add_argument("--events", type=_positive_int, default=1_000_000)
    p.add_argument("--rate", type=_positive_float, default=2_000.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # kafka-python logs transient states (a topic being auto-created) as errors;
        # real failures reach us as exceptions.
        logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        return int(args.func(args))
    except (NcfStreamError, OSError) as e:
        print(f"ncf-stream: error: {e}", file=sys.stderr)
        return 2
    except KafkaError as e:
        print(f"ncf-stream: Kafka error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
