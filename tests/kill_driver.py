"""Run train_sae from a settings JSON and signal the process when the stream hands out batch number N.

    python tests/kill_driver.py SETTINGS_JSON N [SIGNAL]

A JSON list of settings is a group, trained together (train_saes_together) from one stream.

SIGKILL (the default) is a real, uncatchable kill at a deterministic point, for the exact-resume test;
SIGTERM / SIGUSR1 are a scheduler's preemption notice: training checkpoints and the driver exits with 3.
Under torchrun every rank runs this; with SIGNAL_RANK set, only that rank signals itself.
"""

import json
import os
import signal
import sys

from lm_saes import TrainSAESettings, train_sae, train_saes_together
from lm_saes.activation import ActivationStream
from lm_saes.trainer import Preempted

data = json.loads(open(sys.argv[1]).read())
group = [TrainSAESettings.model_validate(d) for d in data] if isinstance(data, list) else None
kill_at = int(sys.argv[2])
signum = getattr(signal, sys.argv[3] if len(sys.argv) > 3 else "SIGKILL")
signals_here = os.environ.get("SIGNAL_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")
original_next = ActivationStream.__next__
served = 0


def next_or_die(self):  # type: ignore[no-untyped-def]
    global served
    served += 1
    if served == kill_at and signals_here:
        os.kill(os.getpid(), signum)
    return original_next(self)


ActivationStream.__next__ = next_or_die  # type: ignore[method-assign]
try:
    if group is None:
        train_sae(TrainSAESettings.model_validate(data))
    else:
        train_saes_together(group)
except Preempted as e:
    print(e, file=sys.stderr)
    sys.exit(3)
