"""Imported last by the forkserver's server, after ``__main__`` and lightning_ddg: moves every object imported so
far out of the garbage collector's reach (``gc.freeze``), so that a collection in a forked stage does not write to
the pages those objects share with the server. Without it each stage copies them, about 120 MiB of torch's and
Lightning's objects, at its first full collection."""

import gc

gc.freeze()
