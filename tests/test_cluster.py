"""Running where clusters run us: preemption (a signal or the PREEMPT file → the step finishes, ranks
agree, rank 0 checkpoints, exit 75, the rerun resumes exactly), torchrun restarts after a killed
worker (resume from the newest checkpoint, same losses as one uninterrupted run), and the SLURM
script's requeue logic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _pretrain_cli import pretrain_args
from milan.tools.cli import run
from milan.train import loop as loop_module
from milan.train.checkpoint import latest_checkpoint
from milan.train.loop import EXIT_PREEMPTED

TESTS = Path(__file__).parent
SCRIPT = TESTS.parent / "scripts" / "slurm" / "milan.sbatch"


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "img_per_s")} for line in lines]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return latest_checkpoint(run_dir)[1]["model"]


def _same_weights(a: Path, b: Path) -> None:
    x, y = _weights(a), _weights(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return pretrain_args(root, out, "optim.steps=12", "run.ckpt_every=5", "run.log_every=2", *extra)


def _at_step(monkeypatch: pytest.MonkeyPatch, step: int, action) -> None:
    """Run `action()` right after optimizer step `step` (its checks, log and checkpoint done)."""
    original = loop_module.Loop._after_step

    def after(self: loop_module.Loop) -> None:
        original(self)
        if self.step == step:
            action()
    monkeypatch.setattr(loop_module.Loop, "_after_step", after)


def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_exactly(shapes_root: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM two steps after the checkpoint of step 5: the process finishes step 7, writes its
    checkpoint and exits with 75; the same command continues from step 7 to the uninterrupted
    run's losses and weights. A second SIGTERM during the save changes nothing."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(_args(shapes_root, full))
    _at_step(monkeypatch, 7, lambda: os.kill(os.getpid(), signal.SIGTERM))
    real_save = loop_module.save_checkpoint

    def save_with_a_second_signal(state: dict, path: Path) -> Path:
        if state["step"] == 8:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return real_save(state, path)
    monkeypatch.setattr(loop_module, "save_checkpoint", save_with_a_second_signal)
    with pytest.raises(SystemExit) as stop:
        run(_args(shapes_root, part))
    assert stop.value.code == EXIT_PREEMPTED
    # alone, the request is seen at the next step's check: step 8 is the last step trained
    assert latest_checkpoint(part)[0].name == "checkpoint-00000008.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the loop
    monkeypatch.undo()
    run(_args(shapes_root, part))
    assert _records(part) == _records(full)
    _same_weights(full, part)


def test_the_preempt_file_stops_a_run_and_is_removed(shapes_root: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    _at_step(monkeypatch, 3, lambda: (out / "PREEMPT").touch())
    with pytest.raises(SystemExit) as stop:
        run(_args(shapes_root, out))
    assert stop.value.code == EXIT_PREEMPTED
    assert latest_checkpoint(out)[1]["step"] == 4 and not (out / "PREEMPT").exists()


def test_every_recipe_stops_on_a_signal(shapes_root: Path, random_pretrain_checkpoint: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook belongs to the loop every recipe runs: finetune stops mid-epoch the same way."""
    out = tmp_path / "ft"
    _at_step(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(SystemExit) as stop:
        run(["finetune", f"model.weights={random_pretrain_checkpoint}", "data.kind=shapes", f"data.path={shapes_root}",
             "data.img_size=32", "data.num_workers=0", "optim.batch_size=16", "optim.epochs=1", "optim.warmup_epochs=0",
             "mixup.mixup=0", "mixup.cutmix=0", f"run.out_dir={out}", "run.device=cpu", "run.tensorboard=false"])
    assert stop.value.code == EXIT_PREEMPTED
    assert torch.load(out / "checkpoint-last.pt", weights_only=True)["step"] == 3


def _torchrun(args: list[str], env: dict[str, str], cwd: Path, *launcher: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *launcher, str(TESTS / "_cluster_worker.py"), *args, "run.device=cpu"],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_the_run_ends_as_one_uninterrupted(shapes_root: Path,
                                                                                 tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed after step 7 (checkpoint at 5); torchrun restarts both workers, rank 1 joins
    3 s late (before the fix, rank 0 then read the dead round's address of rank 1 and failed in
    init_process_group), the run resumes from step 5 and ends with the uninterrupted losses."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    full, part = tmp_path / "full", tmp_path / "part"
    done = _torchrun(_args(shapes_root, full, "optim.batch_size=4"), env, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    again = _torchrun(_args(shapes_root, part, "optim.batch_size=4"), {**env, "MILAN_TEST_KILL": "7,1",
                                                                         "MILAN_TEST_LATE": "3"},
                      tmp_path, "--max-restarts=1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "checkpoint-00000005.pt" in again.stderr
    assert _records(part) == _records(full)
    _same_weights(full, part)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(shapes_root: Path, tmp_path: Path) -> None:
    """Only rank 1 gets SIGTERM (after step 3); the ranks agree at the next multiple of
    run.preempt_every=2, both stop after step 4, one checkpoint; the rerun completes exactly."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]))
    full, part = tmp_path / "full", tmp_path / "part"
    assert _torchrun(_args(shapes_root, full, "optim.batch_size=4"), env, tmp_path).returncode == 0
    stopped = _torchrun(_args(shapes_root, part, "optim.batch_size=4", "run.preempt_every=2"),
                        {**env, "MILAN_TEST_SIGNAL": "3,1"}, tmp_path)
    assert stopped.returncode != 0 and "exit status 75" in stopped.stderr
    assert latest_checkpoint(part)[0].name == "checkpoint-00000004.pt"
    assert _torchrun(_args(shapes_root, part, "optim.batch_size=4"), env, tmp_path).returncode == 0
    assert _records(part) == _records(full)
    _same_weights(full, part)


# --- the SLURM script ---------------------------------------------------------------------------------


def test_the_sbatch_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _fake_slurm(tmp_path: Path, srun_body: str) -> dict[str, str]:
    """`srun` and `scontrol` stand-ins on PATH: scontrol records its calls; srun runs `srun_body`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text('#!/bin/bash\nif [ "$1" = show ]; then echo node-a; echo node-b; '
                                      f'else echo "$@" >> {tmp_path}/scontrol.log; fi\n')
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                SLURM_JOB_NODELIST="node-[a-b]", SLURM_NTASKS="1", MILAN_PYTHON=sys.executable)


@pytest.mark.parametrize(("code", "requeued", "status"), [(75, True, 0), (0, False, 0), (1, False, 1)])
def test_the_script_requeues_on_exit_status_75_only(tmp_path: Path, code: int, requeued: bool, status: int) -> None:
    env = _fake_slurm(tmp_path, f"exit {code}")
    done = subprocess.run(["bash", str(SCRIPT), "pretrain", "run.out_dir=x"], env=env, capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    log = tmp_path / "scontrol.log"
    assert (log.read_text().split() if log.exists() else []) == (["requeue", "4242"] if requeued else [])


@pytest.mark.slow
def test_the_script_runs_milan_and_a_sigusr1_requeues_a_resumable_run(shapes_root: Path, tmp_path: Path) -> None:
    """srun here runs the task itself (one process, the environment srun would give it); SIGUSR1 (what
    `#SBATCH --signal=USR1@180` sends every task) reaches milan, which checkpoints and exits 75; the
    script requeues; the requeued job (the same script again) finishes as one uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    run(_args(shapes_root, full))
    # the task srun would start, with `-m milan` replaced by the fault-injecting launcher
    srun = ('while [[ "$1" == --* ]]; do shift; done\n'
            'args=(); prev=""\n'
            'for a in "$@"; do if [ "$prev" = -m ] && [ "$a" = milan ]; then unset "args[-1]"; '
            f'args+=("{TESTS / "_cluster_worker.py"}"); else args+=("$a"); fi; prev=$a; done\n'
            f'export SLURM_PROCID=0 SLURM_LOCALID=0 PYTHONPATH={TESTS}{os.pathsep}${{PYTHONPATH:-}}\n'
            'exec "${args[@]}"')
    env = _fake_slurm(tmp_path, srun)
    env.update(MILAN_TEST_SIGNAL="6,0", MILAN_TEST_SIGNAL_NAME="SIGUSR1")
    first = subprocess.run(["bash", str(SCRIPT), *_args(shapes_root, part)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert latest_checkpoint(part)[0].name == "checkpoint-00000007.pt"
    del env["MILAN_TEST_SIGNAL"]
    second = subprocess.run(["bash", str(SCRIPT), *_args(shapes_root, part)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _records(part) == _records(full)
    _same_weights(full, part)
