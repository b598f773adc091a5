//! What every handler shares: the engine handle, the tokenizer and chat template, names and
//! limits. Immutable after start-up.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use tpuserve_engine::{EngineHandle, RequestLimits};
use tpuserve_model::{ChatTemplate, Tokenizer};

use crate::gate::GateContext;
use crate::metrics::Metrics;
use crate::validate::Limits;

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub served_model_names: Vec<String>,
    /// The path or id the model was loaded from (`root` in `/v1/models`).
    pub model_root: String,
    /// `--api-key`: any one of these opens /v1 (none: open).
    pub api_keys: Vec<String>,
    pub log_requests: bool,
    pub created: u64,
    pub metrics: Arc<Metrics>,
    /// Requests accepted and not yet answered (for draining on SIGTERM and admission).
    pub in_flight: AtomicUsize,
    /// Most requests in flight at once (`--max-num-seqs` + `--max-waiting-requests`); beyond
    /// it requests are refused with 503. `None`: unbounded.
    pub admission_limit: Option<usize>,
    pub draining: AtomicBool,
    /// `--enable-server-load-tracking`: `/load` reports `in_flight`.
    pub server_load_tracking: bool,
    /// `--enable-tokenizer-info-endpoint`: what `/tokenizer_info` answers.
    pub tokenizer_info: Option<serde_json::Value>,
    /// `--enable-prompt-tokens-details`.
    pub prompt_tokens_details: bool,
    /// `--enable-force-include-usage`.
    pub force_include_usage: bool,
    /// `--return-tokens-as-token-ids`.
    pub return_tokens_as_token_ids: bool,
    /// `--stream-interval`.
    pub stream_interval: usize,
    /// `--scheduling-policy priority`.
    pub priority_scheduling: bool,
    /// `--response-role` (default `assistant`).
    pub response_role: String,
    /// Every id that ends generation (beam search completes a beam on one).
    pub eos_token_ids: Vec<u32>,
    /// `--trust-request-chat-template`.
    pub trust_request_chat_template: bool,
    /// `--default-chat-template-kwargs`: template variables under every request's own.
    pub default_chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// `--enable-auto-tool-choice` with `--tool-call-parser`.
    pub tool_parser: Option<crate::tools::ParserKind>,
    /// `--exclude-tools-when-tool-choice-none`.
    pub exclude_tools_when_tool_choice_none: bool,
    /// `--tool-strict-level`.
    pub tool_strict_level: crate::tools::tags::StrictLevel,
    /// `--generation-config` defaults.
    pub sampling_defaults: crate::validate::SamplingDefaults,
    /// Structured outputs: the grammar compiler for this tokenizer.
    pub grammars: Arc<crate::structured::Grammars>,
}

impl AppState {
    /// What the request gate needs.
    pub fn gate(&self) -> GateContext<'_> {
        GateContext {
            tokenizer: &self.tokenizer,
            chat_template: self.chat_template.as_ref(),
            trust_request_chat_template: self.trust_request_chat_template,
            default_kwargs: self.default_chat_template_kwargs.as_ref(),
            tool_parser: self.tool_parser,
            exclude_tools_when_tool_choice_none: self.exclude_tools_when_tool_choice_none,
            tool_strict_level: self.tool_strict_level,
            limits: Limits {
                engine: self.engine.limits(),
                force_include_usage: self.force_include_usage,
                return_tokens_as_token_ids: self.return_tokens_as_token_ids,
                stream_interval: self.stream_interval,
                priority_scheduling: self.priority_scheduling,
                defaults: self.sampling_defaults,
            },
        }
    }

    /// The engine's limits (model length, vocabulary, max logprobs): the engine owns them.
    pub fn limits(&self) -> RequestLimits {
        self.engine.limits()
    }

    pub fn served_name(&self) -> &str {
        &self.served_model_names[0]
    }

    /// Whether `model` (from a request) names this server's model; absent means yes.
    pub fn model_matches(&self, model: Option<&str>) -> bool {
        model.is_none_or(|m| self.served_model_names.iter().any(|n| n == m))
    }
}

pub type SharedState = Arc<AppState>;

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
