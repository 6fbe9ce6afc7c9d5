import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


def pytest_configure(config):
    if os.geteuid() != 0:
        # ptrace of our own children works without root, but the kernel-uprobe
        # comparisons and /proc/PID/mem of other processes need it.
        pass
