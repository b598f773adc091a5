//! The engine's errors: a rejected request (HTTP 400 material) or an engine that cannot run.

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)")]
    EmptyPrompt,
    /// `param`: the request field that held it (`prompt`; the lists of ids a request sends
    /// are checked whole, `RequestLimits::token_list`). vLLM's words.
    #[error("Token id {token} is out of vocabulary")]
    TokenOutOfRange {
        param: &'static str,
        token: i64,
        vocab_size: usize,
    },
    /// `reason` is the whole message and names `param` (vLLM's wording, e.g.
    /// "top_p must be in (0, 1], got 1.5.").
    #[error("{reason}")]
    InvalidParameter { param: &'static str, reason: String },
    /// A refusal vLLM 0.32 raises without naming a parameter (its error body's `param` is
    /// null): `n`, the penalties, `top_k`, `min_p`, `min_tokens`. `field` is for tests and
    /// logs only.
    #[error("{reason}")]
    Unnamed { field: &'static str, reason: String },
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
