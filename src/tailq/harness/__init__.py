"""Evaluation harness: workloads, training loop, network emulation, metrics, reports."""
