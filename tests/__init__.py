"""Codedance's test suite; `tests.services` holds the helpers that start external programs."""
