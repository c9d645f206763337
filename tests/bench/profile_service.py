"""`python -m tests.bench.profile_service OUT MODULE`: run a service under cProfile, writing OUT on any exit.

`python -m cProfile` writes nothing when the process ends by a signal, and uvicorn re-raises SIGTERM
after its graceful shutdown; this handler (which uvicorn restores and re-raises to) dumps first.
"""

from __future__ import annotations

import atexit
import cProfile
import runpy
import signal
import sys
from types import FrameType

out, module = sys.argv[1], sys.argv[2]
sys.argv = [module]
profiler = cProfile.Profile()
dumped = False


def dump() -> None:
    global dumped
    if not dumped:
        dumped = True
        profiler.disable()
        profiler.dump_stats(out)


def on_term(signum: int, frame: FrameType | None) -> None:
    dump()
    sys.exit(128 + signum)


atexit.register(dump)
signal.signal(signal.SIGTERM, on_term)
profiler.enable()
runpy.run_module(module, run_name="__main__", alter_sys=True)
