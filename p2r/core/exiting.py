"""Exit without the interpreter's final garbage collection.

A process that has imported torch, transformers and vLLM holds millions of tracked objects;
the cyclic collection Python runs while finalizing took about 3 s of every ``p2r serve`` stop
(and of every engine core and worker process after it), after all the real work - draining,
the engine's teardown - was done. Freezing the heap first (``gc.freeze``) leaves those objects
to the OS, which reclaims the memory anyway; module teardown, ``atexit`` handlers and every
``with``-closed file are unaffected. Only objects kept alive by a reference cycle skip their
finalizers, and nothing of ours relies on that.
"""

from __future__ import annotations

import atexit
import gc


def skip_exit_collection() -> None:
    """Move every tracked object to the permanent generation, so finalization does not scan it."""
    gc.freeze()


def skip_exit_collection_at_exit() -> None:
    """Register ``skip_exit_collection`` to run at exit, after the handlers registered later."""
    atexit.register(skip_exit_collection)
