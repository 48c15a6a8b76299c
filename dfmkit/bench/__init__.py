"""Benchmark helpers: model FLOPs and MFU (:mod:`dfmkit.bench.flops`), the ``dfmkit bench`` parallelism
matrix (:mod:`dfmkit.bench.matrix`), sampling latency (:mod:`dfmkit.bench.sampling`) and CUDA-event
timing (:mod:`dfmkit.bench.timing`)."""
