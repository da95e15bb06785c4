"""Write deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/alerts.yml, so they cannot drift.

    python scripts/prometheus_rule.py            # print the PrometheusRule
    python scripts/prometheus_rule.py --write    # rewrite deploy/kubernetes/prometheusrule.yaml
    python scripts/prometheus_rule.py --check    # exit 1 if the committed file is out of date

The Prometheus Operator loads rules from PrometheusRule objects, not from files: the object's
spec.groups is alerts.yml's `groups:` block as it is (comments included), indented under `spec:`.
tests/test_kubernetes.py fails until the script is re-run after a change of alerts.yml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE = ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml"
COMMAND = "python scripts/prometheus_rule.py --write"

HEADER = f"""\
# GENERATED from deploy/prometheus/alerts.yml by: {COMMAND}
# Do not edit: change alerts.yml (and its promtool tests, alerts.test.yml), then re-run the command.
#
# The Prometheus Operator's rule selector (spec.ruleSelector of the Prometheus object) must match a
# label below; kube-prometheus-stack selects `release: <its release name>` by default. What each
# alert means and what to do: docs/monitoring.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: vote-aggregator
  labels:
    app.kubernetes.io/name: vote-aggregator
    release: prometheus
spec:
"""


def render() -> str:
    """The PrometheusRule: alerts.yml from its `groups:` line on, indented under `spec:`."""
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    start = lines.index("groups:")
    body = [f"  {line}" if line else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"rewrite {RULE.relative_to(ROOT)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the committed file is out of date")
    args = parser.parse_args(argv)
    wanted = render()
    if not (args.write or args.check):
        sys.stdout.write(wanted)
        return 0
    current = RULE.read_text(encoding="utf-8") if RULE.exists() else ""
    if args.check:
        if current != wanted:
            print(f"{RULE.relative_to(ROOT)} is out of date; regenerate it with: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    if current != wanted:
        RULE.write_text(wanted, encoding="utf-8")
        print(f"rewrote {RULE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
