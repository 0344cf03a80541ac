"""Run ``birdwatch`` under cProfile timed by CPU (not wall) time: ``python bench/cpuprofile.py OUT.prof run ...``.

Wall-clock profiles of an event loop on a busy 2-core machine mostly show waiting; this one shows where the CPU goes.
"""

import cProfile
import sys
import time

from birdwatch.cli import main

profiler = cProfile.Profile(time.process_time)
out, argv = sys.argv[1], sys.argv[2:]
profiler.enable()
try:
    code = main(argv)
finally:
    profiler.disable()
    profiler.dump_stats(out)
sys.exit(code)
