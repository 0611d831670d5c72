"""The example alert rules in deploy/prometheus/ are valid and fire when they should
(promtool, from Debian's prometheus package)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import require_program  # tests/conftest.py

RULES = Path(__file__).resolve().parents[1] / "deploy/prometheus/alerts.yml"

# Series every minute: the model stops taking in events while 500 wait (stale), and a
# quiet stream whose model is just as old (no lag: not stale).
CASES = f"""
rule_files: [{RULES}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'ncf_stream_model_age_seconds{{job="a"}}'
        values: '0+60x30'
      - series: 'ncf_stream_consumer_lag{{job="a"}}'
        values: '500x30'
      - series: 'ncf_stream_model_age_seconds{{job="b"}}'
        values: '0+60x30'
      - series: 'ncf_stream_consumer_lag{{job="b"}}'
        values: '0x30'
      - series: 'ncf_stream_source_up{{job="a"}}'
        values: '1 1 0x20'
      - series: 'ncf_stream_users_in_several_partitions_total{{job="a"}}'
        values: '0x10 3x20'
      - series: 'ncf_stream_users_in_several_partitions_total{{job="b"}}'
        values: '2x30'
    alert_rule_test:
      - eval_time: 12m
        alertname: NcfStreamModelStale
        exp_alerts: []
      - eval_time: 20m
        alertname: NcfStreamModelStale
        exp_alerts:
          - exp_labels: {{severity: page, job: a}}
            exp_annotations:
              summary: ncf-stream serves a model over 10 minutes old while events wait
      - eval_time: 20m
        alertname: NcfStreamSourceDown
        exp_alerts:
          - exp_labels: {{severity: ticket, job: a}}
            exp_annotations:
              summary: "ncf-stream's event source has been down for 5 minutes (see /healthz)"
      - eval_time: 12m
        alertname: NcfStreamEventsNotKeyedByUser
        exp_alerts:
          - exp_labels: {{severity: ticket, job: a}}
            exp_annotations:
              summary: ncf-stream sees users whose events arrive in more than one partition
      - eval_time: 30m
        alertname: NcfStreamEventsNotKeyedByUser
        exp_alerts: []
"""


def test_alert_rules_fire_on_a_stale_model_with_lag_a_down_source_and_unkeyed_events(
    tmp_path: Path,
) -> None:
    promtool = require_program("promtool", why=".ci/run installs Debian's prometheus")
    subprocess.run([promtool, "check", "rules", str(RULES)], check=True, capture_output=True)
    cases = tmp_path / "cases.yml"
    cases.write_text(CASES)
    run = subprocess.run([promtool, "test", "rules", str(cases)], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout + run.stderr
