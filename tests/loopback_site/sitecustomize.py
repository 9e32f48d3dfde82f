"""Python runs this at start-up when this folder is on PYTHONPATH: the loopback guard for the
children of tests and benchmarks (see tests/loopback_guard.py). No-op without LOOPBACK_GUARD_LOG.

A pytest worker (pytest-xdist) is such a child too, and its conftest imports the guard again as
`tests.loopback_guard`: both names are made to point at the one module installed here, so there
is one `LeftLoopbackError` class and one `blocked` list per process, whichever name a test uses."""

import os

if os.environ.get("LOOPBACK_GUARD_LOG"):
    import importlib
    import sys

    _tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _tests)
    try:
        _guard = importlib.import_module("loopback_guard")
        _guard.install()
        sys.modules.setdefault("tests.loopback_guard", _guard)
    finally:
        sys.path.remove(_tests)
