"""`metarec quickstart`, the README's first command, run as a user runs it: the installed
console script, in its own process, with its default settings."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROW = re.compile(r"^\| (?P<name>[^|]+?) +\| +(?P<mae>[0-9.]+) \| +(?P<ndcg>[0-9.]+) \|$")
METHODS = [
    "global model, no adaptation",
    "global model, fine-tuned",
    "MAML meta-model, no adaptation",
    "MAML meta-model, adapted",
]


def _console_script():
    script = Path(sys.executable).with_name("metarec")
    if not script.exists():
        pytest.skip("the metarec console script is not installed beside this Python (pip install -e .)")
    return script


def test_quickstart_prints_its_table_and_adaptation_helps():
    script = _console_script()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([str(script), "quickstart", "--quiet"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m["name"]: (float(m["mae"]), float(m["ndcg"]))
            for m in map(ROW.match, proc.stdout.splitlines()) if m}
    assert list(rows) == METHODS, proc.stdout
    for name, (mae, ndcg) in rows.items():
        assert 0.0 < mae < 4.0 and 0.0 < ndcg <= 1.0, (name, mae, ndcg)
    # What the quickstart is there to show: a few gradient steps on a cold-start user's first
    # ratings improve the meta-model's predictions for the rest of them.
    assert rows["MAML meta-model, adapted"][0] < rows["MAML meta-model, no adaptation"][0], proc.stdout
    assert re.search(r"^Done in \d+ s\.$", proc.stdout, re.MULTILINE), proc.stdout


@pytest.mark.parametrize("value, message", [("zero", "invalid int value: 'zero'"),
                                            ("0", "must be at least 1; got 0")])
def test_quickstart_rejects_a_bad_epoch_count(value, message):
    script = _console_script()
    proc = subprocess.run([str(script), "quickstart", "--epochs", value], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
