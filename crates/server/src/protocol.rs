//! OpenAI / vLLM request and response bodies, field for field as vLLM's OpenAI server has them.
//! Numbers are parsed wide (i64 / f64) and range-checked by the validation gate, so that an
//! out-of-range value is a clear 400 rather than a parse failure with a vague message.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

impl StopSpec {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopSpec::One(s) => vec![s],
            StopSpec::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// Usage on every chunk (with `include_usage`), as vLLM.
    pub continuous_usage_stats: Option<bool>,
}

/// vLLM's `RepetitionDetectionParams` (a dataclass: unknown keys are an error).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RepetitionDetectionFields {
    pub max_pattern_size: Option<i64>,
    pub min_pattern_size: Option<i64>,
    pub min_count: Option<i64>,
}

/// Sampling and stopping fields shared by both endpoints (vLLM's extras included).
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct SamplingFields {
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// vLLM: end a sequence whose output ends in a repeated n-gram (`finish_reason`
    /// `repetition`).
    pub repetition_detection: Option<RepetitionDetectionFields>,
    /// vLLM: lower values are served first under `--scheduling-policy priority`; anything but
    /// 0 is refused otherwise (as vLLM does).
    pub priority: Option<i64>,
    /// vLLM: prefix-cache blocks are shared only with requests of the same salt.
    pub cache_salt: Option<String>,
    /// vLLM: only these token ids may be sampled (logprobs stay the model's).
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM: words that may not be generated (see `validate::bad_words`).
    pub bad_words: Option<Vec<String>>,
    /// vLLM: the logprobs of these tokens at each generated position, in place of the top
    /// alternatives (needs `logprobs`).
    pub logprob_token_ids: Option<Vec<i64>>,
    pub stop: Option<StopSpec>,
    pub stop_token_ids: Option<Vec<i64>>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    pub spaces_between_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub prompt_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's end-user id: accepted, only logged with --enable-log-requests.
    pub user: Option<String>,
    /// vLLM: the response id is `cmpl-` / `chatcmpl-` and this (an `X-Request-Id` header
    /// wins), else a random id.
    pub request_id: Option<String>,
    /// vLLM: `prompt_token_ids` and `token_ids` in the response.
    pub return_token_ids: Option<bool>,
    /// vLLM: logprob tokens as `token_id:<id>` strings (unset: `--return-tokens-as-token-ids`).
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM: tokens gathered into each streamed chunk (at least `--stream-interval`).
    pub stream_interval: Option<i64>,
    /// vLLM: keep only this many prompt tokens (-1: `max_model_len`).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM: `left` keeps the last tokens (the default), `right` the first.
    pub truncation_side: Option<String>,
    /// vLLM extras refused by name unless neutral.
    #[serde(flatten)]
    pub unimplemented: crate::unsupported::Unimplemented,
    /// `response_format`, `structured_outputs`, `guided_*`.
    #[serde(flatten)]
    pub structured: crate::structured::StructuredFields,
}

fn completion_max_tokens_default() -> Option<i64> {
    Some(16)
}

fn null_is_16<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Ok(Option::<i64>::deserialize(d)?.or(completion_max_tokens_default()))
}

/// A present field as `Some`, `null` included (serde reads `null` as `None` for an `Option`).
fn kept_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Left out or `null`: 16, vLLM's and OpenAI's completions default (vLLM 0.32's
    /// `normalize_null_max_tokens`). Chat has no such default.
    #[serde(
        default = "completion_max_tokens_default",
        deserialize_with = "null_is_16"
    )]
    pub max_tokens: Option<i64>,
    pub echo: Option<bool>,
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ChatMessageIn {
    pub role: String,
    /// Left out: `None`; `null`: `Some(Value::Null)` (only an assistant message may send it,
    /// as vLLM's message types say).
    #[serde(default, deserialize_with = "kept_null")]
    pub content: Option<Value>,
    pub name: Option<String>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub add_special_tokens: Option<bool>,
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub documents: Option<Value>,
    /// A Jinja chat template for this request (only with --trust-request-chat-template).
    pub chat_template: Option<String>,
    /// vLLM's chat `echo`: the last message, when it has the answer's role, is prepended to
    /// every choice (`chat::echo_text`).
    pub echo: Option<bool>,
    /// Given to the chat template as `reasoning_effort` (and `enable_thinking`), as vLLM's
    /// `build_chat_params` does; see `gate::template_kwargs`.
    /// A string here, so that a value outside vLLM's list gets vLLM's message naming the
    /// field (`ReasoningEffort::parse`) rather than a decoder error.
    pub reasoning_effort: Option<String>,
    /// Only decides whether a reasoning parser's output is returned; without a reasoning
    /// parser (vLLM's case for such a model, and always here) the answer is the same.
    pub include_reasoning: Option<bool>,
    /// `false` keeps only the first tool call (and limits "required" to one).
    pub parallel_tool_calls: Option<bool>,
    /// vLLM's `return_prompt_text` (the rendered prompt in the response): refused when true.
    pub return_prompt_text: Option<bool>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// vLLM's `reasoning_effort` values (any other is a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningEffort {
    None,
    Minimal,
    Low,
    Medium,
    High,
    Xhigh,
    Max,
}

impl ReasoningEffort {
    const ALL: [ReasoningEffort; 7] = [
        ReasoningEffort::None,
        ReasoningEffort::Minimal,
        ReasoningEffort::Low,
        ReasoningEffort::Medium,
        ReasoningEffort::High,
        ReasoningEffort::Xhigh,
        ReasoningEffort::Max,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReasoningEffort::None => "none",
            ReasoningEffort::Minimal => "minimal",
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
            ReasoningEffort::Xhigh => "xhigh",
            ReasoningEffort::Max => "max",
        }
    }
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
// Parsed once per request and matched right away: the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum TokenizeRequest {
    Chat {
        model: Option<String>,
        messages: Vec<ChatMessageIn>,
        add_generation_prompt: Option<bool>,
        continue_final_message: Option<bool>,
        add_special_tokens: Option<bool>,
        chat_template_kwargs: Option<serde_json::Map<String, Value>>,
        return_token_strs: Option<bool>,
        /// Rendered into the prompt by the chat template, as in a chat request.
        tools: Option<Value>,
        /// A template for this request (only with --trust-request-chat-template).
        chat_template: Option<String>,
        /// Multimodal settings: refused when set (text-only models).
        mm_processor_kwargs: Option<Value>,
        media_io_kwargs: Option<Value>,
    },
    Text {
        model: Option<String>,
        prompt: String,
        add_special_tokens: Option<bool>,
        return_token_strs: Option<bool>,
    },
}

#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}

/// Token counts. vLLM writes a whole response with every field (`null` where unset) and a
/// streamed chunk with only the fields set: the details are `None` (absent) in chunks and
/// `Some(None)` (`null`) in whole responses ([`Usage::whole`]).
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
    pub completion_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<Option<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<Option<Value>>,
}

impl Usage {
    pub fn new(prompt: usize, completion: usize) -> Self {
        Usage {
            prompt_tokens: prompt,
            total_tokens: prompt + completion,
            completion_tokens: completion,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }

    /// With `--enable-prompt-tokens-details` (`details`), the prompt tokens served from the
    /// prefix cache — only when there were some, as vLLM.
    pub fn with_cached(mut self, details: bool, cached: usize) -> Self {
        if details && cached > 0 {
            self.prompt_tokens_details = Some(Some(serde_json::json!({ "cached_tokens": cached })));
        }
        self
    }

    /// As a whole (non-streamed) response shows it: the unset details as `null`.
    pub fn whole(mut self) -> Self {
        self.prompt_tokens_details.get_or_insert(None);
        self.completion_tokens_details.get_or_insert(None);
        self
    }
}

/// The fields vLLM 0.32 ends a whole response with (its `service_tier`, KV / encoder-cache
/// transfer parameters and request metrics are always `null` here).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResponseTail {
    pub service_tier: Option<Value>,
    pub kv_transfer_params: Option<Value>,
    pub ec_transfer_params: Option<Value>,
    pub metrics: Option<Value>,
}

/// `system_fingerprint`: this server and version (vLLM writes `vllm-<version>-<hash>`).
pub const SYSTEM_FINGERPRINT: &str = concat!("tpuserve-", env!("CARGO_PKG_VERSION"));

/// `logprobs` of a completion choice (legacy OpenAI completions layout).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub text_offset: Vec<usize>,
    pub token_logprobs: Vec<Option<f64>>,
    pub tokens: Vec<String>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    /// With `return_token_ids` (streaming: the chunk's new tokens); `null` otherwise.
    pub token_ids: Option<Vec<u32>>,
    /// Whole responses only (`Some`: shown, `null` unless asked for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Option<Value>>,
    /// With `return_token_ids` (streaming: on a choice's first chunk only); `null` otherwise.
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's MoE routing report: whole responses only, always `null` (dense models).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_experts: Option<Option<Value>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Whole responses, and a stream's last chunk (vLLM: the usage chunk, else each choice's
    /// finishing chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<&'static str>,
    /// Whole responses only.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tail: Option<ResponseTail>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: String,
    /// Null when the answer was only tool calls.
    pub content: Option<String>,
    /// vLLM 0.32's other message fields, `null` here.
    pub refusal: Option<Value>,
    pub annotations: Option<Value>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
    pub reasoning: Option<Value>,
    /// Left out when there are none, as vLLM.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<Value>,
}

impl ChatMessageOut {
    pub fn new(role: String, content: Option<String>, tool_calls: Vec<Value>) -> Self {
        ChatMessageOut {
            role,
            content,
            refusal: None,
            annotations: None,
            audio: None,
            function_call: None,
            reasoning: None,
            tool_calls,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    pub stop_reason: Option<Value>,
    /// With `return_token_ids`; `null` otherwise.
    pub token_ids: Option<Vec<u32>>,
    /// vLLM's MoE routing report: `null` (dense models).
    pub routed_experts: Option<Value>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub prompt_logprobs: Option<Value>,
    /// With `return_token_ids`; `null` otherwise.
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `return_prompt_text` (refused here): `null`.
    pub prompt_text: Option<Value>,
    pub system_fingerprint: &'static str,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tail: Option<ResponseTail>,
}
