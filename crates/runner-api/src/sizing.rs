//! Sizing defaults and rules that the engine, both runners, `tpuserve plan` and
//! `tpuserve serve` share: each is written here once, so a change reaches all of them.
//! (KV bytes per token is the model's: `LlamaConfig::kv_bytes_per_token`.)

/// `--max-num-seqs` when not given (vLLM's default).
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
/// `--max-logprobs` when not given (vLLM's default).
pub const DEFAULT_MAX_LOGPROBS: usize = 20;
/// `--block-size` when not given: tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// `--max-num-batched-tokens` on the host runner: vLLM V1's default token budget.
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS_HOST: usize = 2048;
/// `--max-num-batched-tokens` on XLA devices: every token bucket up to it is compiled at
/// start-up, so a smaller budget starts sooner; 512 still fills a step of decodes.
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS_XLA: usize = 512;

/// The step's token budget: `given`, else the backend's default raised to `max_num_seqs`
/// (a larger `--max-num-seqs` alone must not make the defaults invalid: the budget must hold
/// one token of every running sequence).
pub fn max_num_batched_tokens(given: Option<usize>, xla: bool, max_num_seqs: usize) -> usize {
    let default = if xla {
        DEFAULT_MAX_NUM_BATCHED_TOKENS_XLA
    } else {
        DEFAULT_MAX_NUM_BATCHED_TOKENS_HOST
    };
    given.unwrap_or(default.max(max_num_seqs))
}

/// KV blocks of `block_size` tokens that `budget_bytes` holds at `kv_bytes_per_token`
/// (at least one, so that a tiny budget still gives a cache the engine can refuse by size).
pub fn kv_blocks_in_budget(
    budget_bytes: u64,
    kv_bytes_per_token: usize,
    block_size: usize,
) -> usize {
    let block_bytes = (kv_bytes_per_token as u64)
        .saturating_mul(block_size as u64)
        .max(1);
    ((budget_bytes / block_bytes) as usize).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_defaults_follow_the_backend_and_max_num_seqs() {
        assert_eq!(max_num_batched_tokens(None, false, 256), 2048);
        assert_eq!(max_num_batched_tokens(None, true, 256), 512);
        assert_eq!(max_num_batched_tokens(None, true, 1024), 1024);
        assert_eq!(max_num_batched_tokens(Some(64), true, 1024), 64);
    }

    #[test]
    fn blocks_are_whole_and_never_zero() {
        assert_eq!(kv_blocks_in_budget(1 << 30, 1 << 10, 16), 65536);
        assert_eq!(kv_blocks_in_budget(10, 1 << 10, 16), 1);
    }
}
