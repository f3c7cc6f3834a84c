"""The GPU check cannot fail quietly: a section that raises, hangs past its deadline or dies
makes the run exit non-zero with a one-line summary naming it, and every item is on disk."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_check(tmp_path, fault: str | None, deadline: float = 40) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ)
    env.pop("OVIT_GPU_CHECK_FAULT", None)
    if fault:
        env["OVIT_GPU_CHECK_FAULT"] = fault
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--dry-run", "--sections", "accuracy",
           "--deadline", str(deadline), "--out", str(tmp_path)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = [json.loads(x) for x in (tmp_path / "gpu_check.jsonl").read_text().splitlines() if x.strip()]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["accuracy"]
    return r, lines


@pytest.mark.parametrize("fault,expect", [("raise", "ZeroDivisionError"), ("exit", "exited with 3 in 'injected exit'")])
def test_a_failing_section_fails_the_run(tmp_path, fault, expect):
    r, lines = run_check(tmp_path, fault)
    assert r.returncode == 1, r.stdout[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU CHECK FAILED") and expect in r.stdout, r.stdout[-2000:]
    assert lines[0]["event"] == "start"


def test_a_hanging_section_is_killed_at_its_deadline(tmp_path):
    r, lines = run_check(tmp_path, "hang", deadline=12)
    assert r.returncode == 1
    assert "killed at its deadline" in r.stdout and "'injected hang'" in r.stdout, r.stdout[-2000:]
    assert [x["item"] for x in lines] == ["injected hang"]  # the start line names what hung


def test_a_clean_dry_section_passes(tmp_path):
    r, lines = run_check(tmp_path, None, deadline=120)
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.strip().splitlines()[-1].startswith("GPU CHECK OK")
    items = [x for x in lines if x["event"] == "item"]
    assert len(items) == 16 and all(x["ok"] for x in items)
