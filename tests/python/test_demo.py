"""examples/swarm_digits.py and benchmarks/benchmark_ddp.py end to end, run as a user runs them:
real processes, real sockets, real torch; only their output and exit codes are checked."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "swarm_digits.py"
BENCHMARK = ROOT / "benchmarks" / "benchmark_ddp.py"


def run(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs `script` with this checkout importable, in a process group of its own, so that on a
    timeout its peers are killed along with it (the scripts' own deadlines are shorter; this is
    the backstop). Prints the output, which pytest shows when a test fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        print(output)
        raise AssertionError(f"{script.name} {' '.join(args)} ran past {timeout} s")
    print(output)
    # The scripts kill their children before exiting: nothing of the process group may be left.
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        pass
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"{script.name} left processes running")
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def survivor_lines(output: str) -> dict:
    """peer name -> (accuracy, checksum, swarm size at the end), from the demo's summary."""
    pattern = re.compile(r"^\[demo\] (peer\d+): test accuracy (\S+), steps \d+, parameters sha256 "
                         r"(\S+), swarm size at the end (\S+)$", re.MULTILINE)
    return {name: (float(accuracy), checksum, swarm)
            for name, accuracy, checksum, swarm in pattern.findall(output)}


def test_demo_survives_a_killed_peer():
    result = run(DEMO, "--timeout", "120", timeout=180)
    assert result.returncode == 0, "the demo failed; its output is above"
    out = result.stdout
    assert "[demo] SIGKILL peer3" in out
    survivors = survivor_lines(out)
    assert sorted(survivors) == ["peer0", "peer1", "peer2"]
    for name, (accuracy, _, swarm) in survivors.items():
        assert accuracy >= 0.9, name
        assert swarm == "3", f"{name} still averaged with {swarm} peers after the kill"
    assert len({checksum for _, checksum, _ in survivors.values()}) == 1
    assert "[demo] parameters identical across survivors: yes" in out
    assert "[demo] PASS: 3 survivors" in out


def test_demo_on_gloo_without_kill():
    result = run(DEMO, "--backend", "gloo", "--no-kill", "--timeout", "90", timeout=150)
    assert result.returncode == 0, "the demo failed; its output is above"
    survivors = survivor_lines(result.stdout)
    assert sorted(survivors) == ["peer0", "peer1", "peer2", "peer3"]
    assert all(swarm == "4" for _, _, swarm in survivors.values())
    assert "[demo] parameters identical across survivors: yes" in result.stdout
    assert "[demo] PASS: 4 survivors" in result.stdout


def test_demo_fails_clearly_when_accuracy_is_too_low():
    # 10 steps are far too few to reach 0.9 on digits.
    result = run(DEMO, "--backend", "gloo", "--no-kill", "--steps", "10", "--log-every", "5",
                 "--timeout", "90", timeout=150)
    assert result.returncode == 1
    assert re.search(r"^\[demo\] FAIL: peer\d accuracy \S+ < 0\.9", result.stdout, re.MULTILINE)


def test_demo_deadline_kills_every_peer():
    # The peers cannot even import torch within 0.5 s: the deadline fires, and run() checks that
    # no peer process outlives the demo.
    result = run(DEMO, "--backend", "gloo", "--no-kill", "--timeout", "0.5", timeout=60)
    assert result.returncode == 2
    assert "[demo] FAIL: deadline of" in result.stdout


def test_benchmark_quick():
    result = run(BENCHMARK, "--quick", "--backends", "gloo,hivemind", "--timeout", "60",
                 timeout=240)
    assert result.returncode == 0, "the benchmark failed; its output is above"
    out = result.stdout
    assert re.search(r"^\s*model\s+ranks\s+gloo steps/s\s+hivemind steps/s\s+hivemind/gloo$", out,
                     re.MULTILINE)
    assert re.search(r"^\s*mlp\s+2\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\d$", out, re.MULTILINE)
    assert re.search(r"Kill -> next step completed by every survivor: \d+ ms", out)
