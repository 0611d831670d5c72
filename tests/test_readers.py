"""Ratings file formats: events in timestamp order, every bad line reported by number."""

from __future__ import annotations

from pathlib import Path

import pytest

from ncf_stream.errors import BadInput
from ncf_stream.readers import BadLine, detect_format, iter_raw_lines, read_events


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def rows(path: Path, fmt: str | None = None, **kw: object) -> list[tuple[str, str, float, float]]:
    ev = read_events(path, fmt, **kw).events  # type: ignore[arg-type]
    return list(zip(ev.users.tolist(), ev.items.tolist(), ev.ts.tolist(), ev.weights.tolist(),
                    strict=True))


def test_movielens_dat_sorted_by_time_ties_in_file_order(tmp_path: Path) -> None:
    text = "1::10::5::300\n2::20::3::100\n1::30::4::300\n3::40::1::200\n"
    path = write(tmp_path, "ratings.dat", text)
    assert rows(path) == [("2", "20", 100.0, 3.0), ("3", "40", 200.0, 1.0),
                          ("1", "10", 300.0, 5.0), ("1", "30", 300.0, 4.0)]
    assert read_events(path).events.types.tolist() == ["rating"] * 4


def test_ml100k_tabs(tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    assert rows(path) == [("196", "242", 881250949.0, 3.0), ("186", "302", 891717742.0, 3.0)]


@pytest.mark.parametrize(
    ("header", "line", "expected"),
    [
        ("userId,movieId,rating,timestamp", "1,31,2.5,1260759144", ("1", "31", 1260759144.0, 2.5)),
        ("user,item,ts", "a,b,7.5", ("a", "b", 7.5, 1.0)),
        ("item,ts,user,weight", "b,3,a,0.5", ("a", "b", 3.0, 0.5)),
    ],
)
def test_csv_headers(tmp_path: Path, header: str, line: str, expected: tuple) -> None:
    path = write(tmp_path, "r.csv", f"{header}\n{line}\n")
    assert rows(path) == [expected]


def test_csv_without_needed_columns_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", "user,thing\n1,2\n")
    with pytest.raises(BadInput, match="item, ts"):
        read_events(path)


def test_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl",
                 '{"user": 1, "item": "x", "ts": 2, "type": "click", "weight": 2}\n'
                 '{"user": "2", "item": "y", "ts": 1}\n')
    result = read_events(path)
    assert rows(path) == [("2", "y", 1.0, 1.0), ("1", "x", 2.0, 2.0)]
    assert result.events.types.tolist() == ["interaction", "click"]
    assert result.lines.tolist() == [2, 1]


def test_every_bad_line_is_reported_with_its_number(tmp_path: Path) -> None:
    text = ("1::10::5::300\n"      # 1 good
            "1::10::5\n"           # 2 too few fields
            "\n"                   # 3 blank: not an event, not an error
            "::10::5::300\n"       # 4 empty user
            "1::10::x::300\n"      # 5 bad weight
            "1::10::5::inf\n"      # 6 non-finite ts
            "2::20::1::400\n")     # 7 good
    path = write(tmp_path, "ratings.dat", text)
    seen: list[BadLine] = []
    result = read_events(path, on_bad_line=seen.append)
    assert [b.line for b in result.bad_lines] == [2, 4, 5, 6]
    assert seen == result.bad_lines
    reasons = [b.reason.split(":")[0] for b in result.bad_lines]
    assert reasons[1:] == ["empty_id", "wrong_type", "non_finite"]
    assert "4 fields" in result.bad_lines[0].reason
    assert result.lines.tolist() == [1, 7]


def test_invalid_utf8_is_a_bad_line_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path, "r.csv", b"user,item,ts\n\xff\xfe,1,2\nok,1,3\n")
    result = read_events(path)
    assert [b.line for b in result.bad_lines] == [2]
    assert result.events.users.tolist() == ["ok"]


def test_jsonl_bad_lines(tmp_path: Path) -> None:
    text = '{"user": "1"}\nnot json\n[1]\n{"user":"1","item":"2","ts":1}\n'
    path = write(tmp_path, "e.jsonl", text)
    result = read_events(path)
    assert [(b.line, b.reason.split(":")[0]) for b in result.bad_lines] == [
        (1, "missing_field"), (2, "not_json"), (3, "not_object")]


def test_limit_takes_the_earliest(tmp_path: Path) -> None:
    path = write(tmp_path, "u.data", "1\t1\t1\t30\n2\t2\t1\t10\n3\t3\t1\t20\n")
    assert [r[0] for r in rows(path, limit=2)] == ["2", "3"]


def test_format_detection(tmp_path: Path) -> None:
    assert detect_format("x/ratings.dat") == "movielens"
    assert detect_format("u.data") == "ml100k"
    assert detect_format("a.CSV") == "csv"
    assert detect_format("a.jsonl") == "jsonl"
    with pytest.raises(BadInput, match="--format"):
        detect_format("a.parquet")


def test_raw_lines_are_untouched(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", b'not json\r\n\n{"a": 1}\n\xff\n')
    assert list(iter_raw_lines(path)) == [(1, b"not json"), (3, b'{"a": 1}'), (4, b"\xff")]
