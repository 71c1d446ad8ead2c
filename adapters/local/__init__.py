"""Adapters that run on one machine: in-memory and file-backed ports."""
