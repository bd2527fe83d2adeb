"""Device checks of the Pallas kernels, one module per engine (run by ``experiments.gpu_check``).

Each module has ``check(rows, smoke) -> bool`` (compiled kernels against the
dense float32 oracle, forward and gradients; in smoke mode tiny shapes that
also run on CPU in interpret mode) and ``bench(rows, quick)`` (bfloat16
timings on an NVIDIA GPU against the XLA path and cuDNN dense attention).
"""
