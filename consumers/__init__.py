"""Everything that speaks Kafka: the event source, the producer tool, the CLI.

Depends on :mod:`ncf_stream`; the engine never imports this package.
"""
