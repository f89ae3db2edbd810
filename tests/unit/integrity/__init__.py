"""Tests of shoebox_worker.integrity (a package: tests/unit/tools has a
test_audit.py too)."""
