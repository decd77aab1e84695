"""PyTorch's own distributed tests (tests/python/torch_suite/dist_suite.py) against the backend.

Each case runs the harness in a pytest subprocess, with the suite's environment (BACKEND,
WORLD_SIZE, TEMP_DIR, ...) set before anything imports torch's test modules; dist_suite.py says why.
Backend: env HIVEMIND_SUITE_BACKEND, default "hivemind"; "gloo" or "gloo_plugin" check the harness.

Three runs:
  2 ranks, fork,  every allow-listed test (cheap: ranks are forked from the loaded pytest process)
  3 ranks, fork,  every allow-listed test (odd rank count, subgroup [1, 2])
  2 ranks, spawn, the CORE subset (fresh interpreters that register the backend on import, as in
                  a real launch; each test costs seconds of start-up, hence the subset)

A run fails when any test fails, when nothing was collected (pytest exit code 5), when it runs past
its time limit, when the collected tests differ from the allow-list, or when fewer tests passed
than the minimum, so the suite cannot shrink silently (a torch upgrade renaming tests or changing
their gates). A test that skips itself is reported and allowed, down to that minimum.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SUITE = HERE / "torch_suite" / "dist_suite.py"
# Per run; catches a hang. On an idle 2-core box the three runs take ~25 s, ~55 s and ~60 s.
RUN_TIMEOUT_S = 480
# Allowed self-skips per run. Every allow-listed test runs for a plugin backend on CPU, so none
# should skip; a little slack for a gate that trips on some machine, no more.
MAX_SELF_SKIPS = 2

RUNS = [  # (world size, start method, selection)
    (2, "fork", "all"),
    (3, "fork", "all"),
    (2, "spawn", "core"),
]


def backend_under_test() -> str:
    return os.environ.get("HIVEMIND_SUITE_BACKEND", "hivemind")


def suite_literal(name: str):
    """A top-level literal (RUN, CORE) of dist_suite.py, read from its source.

    Importing dist_suite here would set BACKEND/WORLD_SIZE in this process and import torch's test
    modules; its lists are plain literals, so they are read without running the module.
    """
    for node in ast.parse(SUITE.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"no {name} in {SUITE}")


def expected_tests(selection: str) -> list[str]:
    if selection == "core":
        return suite_literal("CORE")
    return [name for names in suite_literal("RUN").values() for name in names]


def results_by_outcome(junit_xml: Path) -> dict[str, list[str]]:
    """Test names by outcome (passed, failed, skipped) from pytest's JUnit XML report."""
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes["failed"].append(name)
        elif case.find("skipped") is not None:
            outcomes["skipped"].append(name)
        else:
            outcomes["passed"].append(name)
    return outcomes


@pytest.mark.parametrize(("world_size", "start", "selection"), RUNS,
                         ids=[f"{w}ranks-{s}-{c}" for w, s, c in RUNS])
def test_pytorch_distributed_suite(world_size: int, start: str, selection: str, tmp_path: Path) -> None:
    backend = backend_under_test()
    expected = expected_tests(selection)
    junit = tmp_path / "report.xml"
    env = dict(os.environ)
    # Leftovers from an outer launcher would change how the suite's ranks rendezvous.
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "INIT_METHOD", "DIST_SUITE_ALL"):
        env.pop(key, None)
    env.update(
        BACKEND=backend,
        WORLD_SIZE=str(world_size),
        TEMP_DIR=str(tmp_path),
        DIST_SUITE_START=start,
        DIST_SUITE_SELECT=selection,
        # The suite skips every test on a machine with fewer GPUs than ranks; these tests are CPU.
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", str(SUITE)]
    # Own session: on timeout, the whole tree (pytest and the ranks it started) is ended.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"suite ran past {RUN_TIMEOUT_S}s; output tail:\n{output[-8000:]}")

    tail = output[-8000:]
    # Exit code 5 = nothing collected: a failure here, never a pass.
    assert proc.returncode != 5, f"suite collected no test:\n{tail}"
    assert junit.exists(), f"suite wrote no report (exit {proc.returncode}):\n{tail}"
    results = results_by_outcome(junit)
    print(f"\n{backend}, {world_size} ranks, {start}, {selection}: {len(results['passed'])} passed, "
          f"{len(results['failed'])} failed, {len(results['skipped'])} skipped")
    assert proc.returncode == 0 and not results["failed"], (
        f"suite failed (exit {proc.returncode}); failed: {results['failed']}\n{tail}"
    )
    collected = {name for names in results.values() for name in names}
    assert collected == set(expected), (
        f"collected tests differ from the allow-list: missing {sorted(set(expected) - collected)}, "
        f"extra {sorted(collected - set(expected))}"
    )
    minimum = len(expected) - MAX_SELF_SKIPS
    assert len(results["passed"]) >= minimum, (
        f"only {len(results['passed'])} of {len(expected)} tests passed (minimum {minimum}); "
        f"skipped: {results['skipped']}\n{tail}"
    )
