"""Running the proxy: the collector tuning applies to a process the proxy owns only."""

import gc
import subprocess
import sys


def test_a_served_process_freezes_startup_and_collects_young_objects_rarely():
    code = ("import gc; from nextstate.proxy.server import quiet_gc; quiet_gc(); "
            "print(gc.get_threshold()[0], gc.get_freeze_count() > 1000)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["50000", "True"]


def test_importing_the_server_leaves_this_process_collector_alone():
    import nextstate.proxy.server  # noqa: F401

    assert gc.get_threshold()[0] < 50_000
