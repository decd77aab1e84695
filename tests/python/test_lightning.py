"""Lightning trains on the backend through DDPStrategy and through HivemindStrategy, 2 CPU processes.

Each fit runs this same file as a script in a subprocess (``python3 test_lightning.py fit ...``):
Lightning's "ddp" launcher (DDPStrategy's default start_method "popen") then starts rank 1 by
re-running that command line, which is why the fit cannot run inside the pytest process itself.
Real processes do the work and nothing is mocked. Every rank writes what it saw to a JSON file
that the test reads back.

Backend: env HIVEMIND_SUITE_BACKEND, default "hivemind" ("gloo" checks the tests themselves).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FIT_TIMEOUT_S = 240  # two processes importing torch + lightning on a busy 2-core box, plus the fit
WORLD_SIZE = 2
# Valid for a launch that is its own swarm (no initial_peers: the ranks bootstrap through the c10d
# store), so that the real backend accepts them; "min_group_size" counts launches, and there is one.
SWARM_OPTIONS = dict(
    run_id="lightning_test_run",
    host_maddrs=["/ip4/127.0.0.1/tcp/0"],
    matchmaking_time=0.5,
    averaging_timeout=60,
    min_group_size=1,
    target_group_size=4,
)


def rank_value(rank: int) -> float:
    """What rank `rank` logs; with sync_dist=True Lightning must report the ranks' mean on every rank."""
    return 10.0 * rank + 1.0


def backend_under_test() -> str:
    return os.environ.get("HIVEMIND_SUITE_BACKEND", "hivemind")


# ------------------------------------------------------------------------------------------------
# The fit script (runs in the subprocess, and again in each process Lightning launches).
# ------------------------------------------------------------------------------------------------


def fit_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", choices=["ddp", "hivemind"], required=True)
    parser.add_argument("--backend", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist
    from lightning.pytorch import LightningModule, Trainer, seed_everything
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    if "hivemind" in args.backend:
        import hivemind_backend  # noqa: F401  registers the backend for plain DDPStrategy
    torch.set_num_threads(1)  # two ranks share two cores

    class Regression(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)
            self.seen: dict = {}

        def on_fit_start(self) -> None:
            # The process group exists here; record what this rank was configured with.
            self.seen["backend"] = dist.get_backend()
            self.seen["world_size"] = dist.get_world_size()
            self.seen["env"] = {k: v for k, v in os.environ.items() if k.startswith("HIVEMIND_")}
            self.seen["initial_params"] = [p.detach().clone().tolist() for p in self.parameters()]

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            value = torch.tensor(rank_value(self.global_rank))
            self.log("rank_value", value, on_step=False, on_epoch=True, sync_dist=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seed_everything(1234)
    # Same dataset on every rank; Lightning's DistributedSampler gives each rank different samples,
    # so the ranks' gradients differ and only DDP's averaging keeps their parameters equal.
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)

    if args.strategy == "ddp":
        strategy = DDPStrategy(process_group_backend=args.backend)
    else:
        from hivemind_backend.lightning import HivemindStrategy

        strategy = HivemindStrategy(process_group_backend=args.backend, **SWARM_OPTIONS)

    model = Regression()
    trainer = Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)

    rank = trainer.global_rank
    report = dict(
        model.seen,
        rank=rank,
        pid=os.getpid(),
        ppid=os.getppid(),
        launcher=type(trainer.strategy.launcher).__name__,
        strategy=type(trainer.strategy).__name__,
        status=str(trainer.state.status.value),
        metric=float(trainer.callback_metrics["rank_value"]),
        params=[p.detach().tolist() for p in model.parameters()],
        state_syncs=getattr(getattr(trainer.strategy, "shared_state", None), "syncs", None),
    )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------------
# The tests.
# ------------------------------------------------------------------------------------------------


def run_fit(strategy: str, tmp_path: Path) -> list[dict]:
    """Run one 2-process fit; return the ranks' reports, or fail with the tail of the output."""
    env = dict(os.environ)
    # A stale rendezvous from an outer launcher would make Lightning join it instead of launching.
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # The script imports hivemind_backend; make the repository importable without installing it.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "fit", "--strategy", strategy,
           "--backend", backend_under_test(), "--out", str(tmp_path)]
    # Own session, so that on timeout the whole tree (rank 0 and the rank it launched) is ended.
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=FIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"fit did not finish in {FIT_TIMEOUT_S}s; output tail:\n{output[-6000:]}")
    assert proc.returncode == 0, f"fit failed (exit {proc.returncode}); output tail:\n{output[-6000:]}"
    reports = []
    for rank in range(WORLD_SIZE):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no report; output tail:\n{output[-6000:]}"
        reports.append(json.loads(path.read_text()))
    return reports


def check_fit(reports: list[dict], strategy_class: str) -> None:
    expected_mean = sum(rank_value(r) for r in range(WORLD_SIZE)) / WORLD_SIZE
    for rank, rep in enumerate(reports):
        assert rep["rank"] == rank
        assert rep["status"] == "finished"
        assert rep["strategy"] == strategy_class
        # Lightning started rank 1 itself, with its default "popen" launcher (re-running the script).
        assert rep["launcher"] == "_SubprocessScriptLauncher"
        assert rep["backend"] == backend_under_test()
        assert rep["world_size"] == WORLD_SIZE
        # The logged value is the mean over ranks, not this rank's own value.
        assert rep["metric"] == expected_mean, (rank, rep["metric"], expected_mean)
        assert rep["params"] != rep["initial_params"], "training did not change the parameters"
    assert reports[1]["ppid"] == reports[0]["pid"], "rank 1 was not launched by rank 0"
    # DDP averaged the gradients: every rank ends with exactly the same parameters.
    assert reports[0]["params"] == reports[1]["params"]


def test_ddp_strategy_fit(tmp_path):
    reports = run_fit("ddp", tmp_path)
    check_fit(reports, "DDPStrategy")


def test_hivemind_strategy_fit(tmp_path):
    reports = run_fit("hivemind", tmp_path)
    check_fit(reports, "HivemindStrategy")
    if backend_under_test() == "hivemind":
        # HivemindStrategy shares the state (share_state): one sync when the first group formed.
        assert all(rep["state_syncs"] == 1 for rep in reports), [r["state_syncs"] for r in reports]
    # The swarm options reached every rank's environment before training (rank 1 included).
    expected = {
        "HIVEMIND_RUN_ID": "lightning_test_run",
        "HIVEMIND_HOST_MADDRS": "/ip4/127.0.0.1/tcp/0",
        "HIVEMIND_MATCHMAKING_TIME": "0.5",
        "HIVEMIND_TIMEOUT": "60",
        "HIVEMIND_MIN_GROUP_SIZE": "1",
        "HIVEMIND_TARGET_GROUP_SIZE": "4",
    }
    for rep in reports:
        for key, value in expected.items():
            assert rep["env"].get(key) == value, (rep["rank"], key, rep["env"])


def test_registry_names_and_backend():
    from lightning.pytorch.strategies import StrategyRegistry

    from hivemind_backend.lightning import HivemindStrategy

    for name in ("hivemind", "ddp_hivemind"):
        assert StrategyRegistry[name]["strategy"] is HivemindStrategy
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, HivemindStrategy)
        assert strategy.process_group_backend == "hivemind"
    # Registering again (e.g. a module reload) is a no-op, not Lightning's "already present" error.
    HivemindStrategy.register_strategies(StrategyRegistry)
    # Lightning's own "ddp" still means plain DDPStrategy.
    assert StrategyRegistry["ddp"]["strategy"] is not HivemindStrategy


def test_swarm_options_to_env(tmp_path, monkeypatch):
    from datetime import timedelta

    from hivemind_backend.lightning import ENV_VARS, HivemindStrategy

    # A private copy of the environment for this test, restored afterwards.
    ours = {var for _, var in ENV_VARS.values()}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in ours})
    os.environ["HIVEMIND_RUN_ID"] = "from_outside"
    os.environ["HIVEMIND_HOST_MADDRS"] = "/ip4/0.0.0.0/tcp/1234"
    strategy = HivemindStrategy(
        initial_peers="/ip4/1.2.3.4/tcp/5/p2p/QmA",
        matchmaking_time=timedelta(milliseconds=1500),
        averaging_timeout=60,
        identity_path=tmp_path / "id.key",
        announce_maddrs=["/ip4/5.6.7.8/tcp/9"],
        target_group_size=8,
        request_timeout=0.5,
        encryption=False,
        process_group_backend="gloo",
    )
    assert "HIVEMIND_TARGET_GROUP_SIZE" not in os.environ  # nothing is exported at construction
    strategy._export_swarm_env()  # what setup_environment / setup_distributed do first
    assert os.environ["HIVEMIND_INITIAL_PEERS"] == "/ip4/1.2.3.4/tcp/5/p2p/QmA"
    assert os.environ["HIVEMIND_MATCHMAKING_TIME"] == "1.5"
    assert os.environ["HIVEMIND_TIMEOUT"] == "60"
    assert os.environ["HIVEMIND_REQUEST_TIMEOUT"] == "0.5"
    assert os.environ["HIVEMIND_ENCRYPTION"] == "false"
    assert os.environ["HIVEMIND_IDENTITY_PATH"] == str(tmp_path / "id.key")
    assert os.environ["HIVEMIND_ANNOUNCE_MADDRS"] == "/ip4/5.6.7.8/tcp/9"
    assert os.environ["HIVEMIND_TARGET_GROUP_SIZE"] == "8"
    assert "HIVEMIND_MIN_GROUP_SIZE" not in os.environ
    assert "HIVEMIND_BOOTSTRAP_TIMEOUT" not in os.environ
    # Options not given leave what the environment already had.
    assert os.environ["HIVEMIND_RUN_ID"] == "from_outside"
    assert os.environ["HIVEMIND_HOST_MADDRS"] == "/ip4/0.0.0.0/tcp/1234"
    # The default backend is hivemind.
    assert HivemindStrategy().process_group_backend == "hivemind"


def test_invalid_swarm_options():
    from hivemind_backend.lightning import HivemindStrategy

    # The backend's own rules (hivemind_backend.c10d.resolve_options), applied at construction.
    for bad in (dict(matchmaking_time=0), dict(averaging_timeout=-1), dict(min_group_size=0),
                dict(target_group_size=2.5), dict(target_group_size=-1), dict(run_id="has space"),
                dict(initial_peers=["/ip4/1.2.3.4/tcp/5", ""]), dict(encryption="maybe")):
        with pytest.raises(ValueError):
            HivemindStrategy(**bad)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fit"]:
        fit_main(sys.argv[2:])
    else:
        sys.exit(f"usage: {sys.argv[0]} fit --strategy ddp|hivemind --backend NAME --out DIR")
