"""Thin adapters for Lightning, Accelerate, FSDP2; optional dependencies import-guarded."""
