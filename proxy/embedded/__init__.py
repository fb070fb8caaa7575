"""Embedded (single-process) implementations of the shared-state ports."""
