"""Benchmarks that measure the selectors against real quality labels (:mod:`.real`)."""
