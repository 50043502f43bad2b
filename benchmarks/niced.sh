#!/bin/bash
# Run a command at high CPU priority on a shared Linux machine (root needed for negative values).
# With autogroup scheduling (kernel.sched_autogroup_enabled=1) `nice` alone only ranks processes of one
# session against each other; every other session keeps an equal share. Start this under `setsid` so the
# command gets its own autogroup, and that group is given nice -10 too.
#   setsid benchmarks/niced.sh .venv/bin/python benchmarks/bench_bridge.py ...
if [ -w /proc/self/autogroup ]; then echo -10 > /proc/self/autogroup; fi
exec nice -n -10 "$@"
