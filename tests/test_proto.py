"""The generated gRPC code matches ncf_stream/proto/recommender.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("recommender_pb2.py", "recommender_pb2_grpc.py", "recommender_pb2.pyi")


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    (tmp_path / "ncf_stream" / "proto").mkdir(parents=True)
    shutil.copy(ROOT / "ncf_stream/proto/recommender.proto", tmp_path / "ncf_stream/proto")
    rc = protoc.main(["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                      f"--grpc_python_out={tmp_path}", f"--pyi_out={tmp_path}",
                      str(tmp_path / "ncf_stream/proto/recommender.proto")])
    assert rc == 0
    for name in GENERATED:
        fresh = (tmp_path / "ncf_stream/proto" / name).read_text()
        assert fresh == (ROOT / "ncf_stream/proto" / name).read_text(), (
            f"{name} is stale: regenerate with python -m grpc_tools.protoc -I. --python_out=. "
            "--grpc_python_out=. --pyi_out=. ncf_stream/proto/recommender.proto")
