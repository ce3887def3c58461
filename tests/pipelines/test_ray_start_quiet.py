"""What Ray's C++ core writes to file descriptor 2 while it starts stays off the terminal;
anything else written there meanwhile is passed on (no Ray needed)."""

from __future__ import annotations

import os

from pipelines.executors.ray import _without_ray_core_notices


def test_core_info_lines_are_dropped_and_the_rest_passed_on(capfd):
    with _without_ray_core_notices():
        os.write(2, b"[2026-12-07 16:14:01,539 I 22544 22544] logging.cc:303: Set ray log level from env to 3\n")
        os.write(2, b"something a user should see\n")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "something a user should see\nafter\n"
