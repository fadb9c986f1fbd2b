"""Benchmark helpers (floor 7, first): what ``benches/`` and the demo share.

* :mod:`.benchmark` -- device timing, CUDA graphs, ceilings, FLOP counts, tables;
* :mod:`.timing` -- one distillation step set up and timed (time, peak memory);
* :mod:`.kernel_report` -- every kernel specialisation compiled for sm_80/sm_90 without a GPU
  (it intercepts :mod:`fastsfm.kernels`' launchers, the one import of kernels outside the loss);
* :mod:`.stub_driver` -- Triton's real launch path with only the driver call stubbed.

Imports: every wing below (floors 1-6).
"""
