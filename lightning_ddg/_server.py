"""Imported last by the forkserver's server, after ``__main__`` and lightning_ddg.

- Moves every object imported so far out of the garbage collector's reach (``gc.freeze``), so that a collection in
  a forked stage does not write to the pages those objects share with the server. Without it each stage copies
  them, about 120 MiB of torch's and Lightning's objects, at its first full collection.
- A launcher stopped (SIGINT, SIGTERM) while it asks the server for a stage closes the request's socket before its
  file descriptors arrive, and the server's loop ends with ``EOFError``. The launcher stops the job and says why;
  the server ends without a traceback, which would be a second and misleading report.
"""

import gc
import os
import sys

gc.freeze()

_SERVER = os.getpid()


def _quiet_when_the_launcher_is_gone(kind, value, traceback):  # noqa: ANN001, ANN202 - sys.excepthook's signature
    if os.getpid() == _SERVER and issubclass(kind, EOFError):
        return
    sys.__excepthook__(kind, value, traceback)


sys.excepthook = _quiet_when_the_launcher_is_gone
