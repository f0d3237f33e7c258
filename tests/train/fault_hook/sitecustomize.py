"""Loaded by Python at start-up when this folder is on PYTHONPATH (tests/train/test_kill_mid_checkpoint.py):
SIGKILLs the process at the moment ``$ZO_SCALE_KILL_AT`` names, inside the checkpoint writer.

- ``weights``: in the second checkpoint, right after its first weights file is written;
- ``rename``: in the second checkpoint's commit, after the old checkpoint was renamed aside and before
  the staged one is renamed into place (the only moment neither is at ``checkpoint``).
"""

import os
import signal

WHERE = os.environ.get("ZO_SCALE_KILL_AT")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if WHERE == "weights":
    import transformers.modeling_utils as modeling_utils

    _real_save, _saves = modeling_utils.safe_save_file, []

    def _save_then_die(*args, **kwargs):
        _real_save(*args, **kwargs)
        _saves.append(1)
        if len(_saves) == 2:
            _die()

    modeling_utils.safe_save_file = _save_then_die
elif WHERE == "rename":
    _real_replace, _commits = os.replace, []

    def _replace_or_die(src, dst, *args, **kwargs):
        if str(src).endswith("checkpoint.tmp"):
            _commits.append(1)
            if len(_commits) == 2:
                _die()
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace_or_die
