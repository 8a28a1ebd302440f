"""`milan` under torchrun / srun in the cluster tests, with one fault injected from the environment:

    MILAN_TEST_KILL=step,rank      SIGKILL rank `rank` once it finishes `step` in torchrun's first round
    MILAN_TEST_SIGNAL=step,rank    send SIGTERM (or MILAN_TEST_SIGNAL_NAME) to rank `rank` after `step`
    MILAN_TEST_LATE=seconds        in torchrun's restart rounds, rank 1 joins the group this much later
                                   (rank 0 then reads rank 1's store key first: the stale-key race)
"""

from __future__ import annotations

import os
import signal
import sys
import time

from milan.tools.cli import run
from milan.train import loop as loop_module

RANK = int(os.environ.get("RANK", 0))
ROUND = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _at(name: str) -> tuple[int, int] | None:
    value = os.environ.get(name)
    return tuple(int(v) for v in value.split(",")) if value else None  # type: ignore[return-value]


kill, term = _at("MILAN_TEST_KILL"), _at("MILAN_TEST_SIGNAL")
original = loop_module.Loop._after_step


def _after_step(self: loop_module.Loop) -> None:
    original(self)
    if kill and ROUND == 0 and (self.step, RANK) == kill:
        os.kill(os.getpid(), signal.SIGKILL)
    if term and (self.step, RANK) == term:
        os.kill(os.getpid(), signal.Signals[os.environ.get("MILAN_TEST_SIGNAL_NAME", "SIGTERM")])


loop_module.Loop._after_step = _after_step
if ROUND > 0 and RANK == 1 and os.environ.get("MILAN_TEST_LATE"):
    time.sleep(float(os.environ["MILAN_TEST_LATE"]))
run(sys.argv[1:])
