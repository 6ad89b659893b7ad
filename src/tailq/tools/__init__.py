"""Tools behind the CLI that are not the training harness: the codec demo, the benchmarks, gradient samples."""
