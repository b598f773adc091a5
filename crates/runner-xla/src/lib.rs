//! PJRT / XLA runner (issue 6): StableHLO emission, plugin loading, buckets, compile cache.
