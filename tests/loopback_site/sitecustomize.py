"""Python runs this at start-up when this folder is on PYTHONPATH: the loopback guard for the
children of tests and benchmarks (see tests/loopback_guard.py). No-op without LOOPBACK_GUARD_LOG."""

import os

if os.environ.get("LOOPBACK_GUARD_LOG"):
    import importlib
    import sys

    _tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _tests)
    try:
        importlib.import_module("loopback_guard").install()
    finally:
        sys.path.remove(_tests)
