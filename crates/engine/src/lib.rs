//! The continuous-batching engine (vLLM V1's EngineCore, in one process): request lifecycle,
//! scheduler with a token budget, chunked prefill and preemption by recompute, paged KV block
//! manager with hash-chained prefix caching, stop conditions, incremental detokenization and
//! per-step stats. No HTTP and no tensors: the model runs behind `tpuserve_runner_api`.
//!
//! The server builds an [`EngineCore`], takes a stats receiver if it wants one, moves the core
//! onto its thread with [`EngineHandle::spawn`]; per request it passes an [`EngineRequest`]
//! through the gate ([`EngineHandle::validate`]), queues the [`ValidatedRequest`] with
//! [`EngineHandle::add`] and reads [`RequestOutput`] events from the returned
//! [`RequestStream`].

pub mod block_manager;
pub mod detokenizer;
pub mod engine;
pub mod error;
pub mod handle;
pub mod output;
pub mod pyfmt;
pub mod request;
mod request_state;
pub mod scheduler;
pub mod sequence;
pub mod stats;
pub mod stop;
pub mod structured;
#[cfg(test)]
mod testing;
pub mod validation;

pub use detokenizer::{DecodeError, DetokenizeOptions, IncrementalDetokenizer, TokenDecoder};
pub use engine::{EngineConfig, EngineCore};
pub use error::{EngineError, RequestError};
pub use handle::EngineHandle;
pub use output::{
    CompletionOutput, FinalOutput, PromptInfo, RequestOutput, RequestStream, SeqDelta,
};
pub use request::{
    BlockId, EngineRequest, Finish, FinishReason, RepetitionDetection, RequestId, SeqId,
    StopParams, StopReason,
};
pub use scheduler::SchedulingPolicy;
pub use stats::{FinishedSeqStats, StepStats};
pub use tpuserve_runner_api::{SamplingParams, TokenId, TokenLogprobs};
pub use validation::{RequestLimits, ValidatedRequest};
