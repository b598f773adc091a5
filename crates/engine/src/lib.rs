//! Continuous-batching engine (issue 3): scheduler, KV block manager, request lifecycle.
