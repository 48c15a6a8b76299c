"""Benchmark helpers: model FLOP counting and MFU (:mod:`dfmkit.bench.flops`)."""
