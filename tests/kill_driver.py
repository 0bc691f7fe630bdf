"""Run train_sae from a settings JSON and SIGKILL the process when the stream hands out batch number N.

    python tests/kill_driver.py SETTINGS_JSON N

A real, uncatchable kill at a deterministic point, for the exact-resume test.
"""

import json
import os
import signal
import sys

from lm_saes import TrainSAESettings, train_sae
from lm_saes.activation import ActivationStream

settings = TrainSAESettings.model_validate(json.loads(open(sys.argv[1]).read()))
kill_at = int(sys.argv[2])
original_next = ActivationStream.__next__
served = 0


def next_or_die(self):  # type: ignore[no-untyped-def]
    global served
    served += 1
    if served == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original_next(self)


ActivationStream.__next__ = next_or_die  # type: ignore[method-assign]
train_sae(settings)
