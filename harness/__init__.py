"""Everything the four scripts (model.py, diffusion.py, train.py, sample.py) call by name, beneath them: skip it on a
first read. Importing any of it changes nothing in tinygrad; the one module that hooks tinygrad's internals (kernels)
does so only when install() is called.

  cli       flag types, output any terminal can take, Ctrl-C as one line
  devices   the backend and its dtype, the devices a batch is split over, calls on all of them at once
  kernels   what tinygrad is told when it compiles the step: tensor cores, pinned schedules, one lowering per backend
  speed     the speed devices, each beside its plain formula, and the switch to the plain formulas
  rundir    checkpoints, the log and the lock of a run directory; resuming; loading a model; the shipped models
  display   the progress line, terminal frames, the HTML replay, SVG plots
  quality   sample quality (generative perplexity, entropy, repetition, copying) and the quality table
  bench     the benchmark: python -m harness.bench"""
