"""Real parts a test needs: skipped on a developer's machine, a failure under CI=true."""

from __future__ import annotations

import pytest
from conftest import require_program  # tests/conftest.py

MISSING = "ncf-stream-no-such-program"


def test_a_missing_program_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=MISSING):
        require_program(MISSING)


def test_a_missing_program_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        require_program(MISSING)


def test_the_first_present_alternative_is_used() -> None:
    assert require_program(MISSING, "sh").endswith("/sh")
