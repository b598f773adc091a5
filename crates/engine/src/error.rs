//! The engine's errors: a rejected request (HTTP 400 material) or an engine that cannot run.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Same wording as vLLM's OpenAI server, which clients match on.
    #[error(
        "This model's maximum context length is {max_model_len} tokens. However, you requested \
         {requested} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). \
         Please reduce the length of the messages or completion."
    )]
    ContextLengthExceeded {
        max_model_len: usize,
        requested: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error("token id {token} is outside the vocabulary ({vocab_size} tokens)")]
    TokenOutOfRange { token: u32, vocab_size: usize },
    #[error("invalid parameter `{param}`: {reason}")]
    InvalidParameter { param: &'static str, reason: String },
    #[error("request id {0} is already in use")]
    DuplicateId(crate::request::RequestId),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("the engine thread could not start: {0}")]
    Spawn(String),
    #[error("the engine has stopped")]
    Stopped,
}
