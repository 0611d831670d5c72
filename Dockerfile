# ncf-stream daemon image (CPU; for CUDA start from a CUDA base and add the gpu extra).
# Not built in CI (no Docker engine there); tests check its syntax and paths.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY ncf_stream ./ncf_stream
COPY consumers ./consumers
RUN pip install --no-cache-dir .
# State a volume may be mounted over (deploy/compose.group.yaml): a named volume starts
# with this directory's owner, so the daemon (nobody) can write its checkpoints there.
RUN mkdir -p /var/lib/ncf-stream && chown nobody /var/lib/ncf-stream

# Inside a container network the servers must listen beyond loopback.
ENV NCF_STREAM_HTTP_HOST=0.0.0.0 \
    NCF_STREAM_GRPC_HOST=0.0.0.0 \
    NCF_STREAM_KAFKA_BOOTSTRAP=kafka:9092

EXPOSE 8080 50051
USER nobody
ENTRYPOINT ["ncf-stream"]
CMD ["serve"]
