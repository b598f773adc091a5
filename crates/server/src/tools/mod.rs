//! Tool calling in chat completions, as vLLM 0.32 serves it: the `--tool-call-parser`
//! parsers tpuserve has (`llama3_json`, `hermes`, `mistral`), each reading calls out of a
//! whole answer or out of a stream of text deltas, and `tool_choice` "required" / named
//! function, which constrain the answer to JSON (`choice`) and read the calls from it.

pub mod choice;
mod hermes;
mod llama;
mod mistral;
mod partial;
pub mod pyjson;
pub mod tags;

use rand::Rng;
use serde_json::{json, Map, Value};

pub use choice::{tool_choice_schema, ToolMode};

/// A tool call in a response (`message.tool_calls[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON text.
    pub arguments: String,
}

impl ToolCall {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "type": "function",
            "function": {"name": self.name, "arguments": self.arguments}})
    }
}

/// What a parser read from a whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl Extracted {
    fn content(text: &str) -> Self {
        Extracted {
            content: Some(text.to_string()),
            calls: Vec::new(),
        }
    }
}

/// vLLM's `make_tool_call_id`: `chatcmpl-tool-` and a random uuid4's 32 hex digits.
pub fn random_call_id() -> String {
    let n: u128 = rand::rng().random();
    format!("chatcmpl-tool-{n:032x}")
}

/// Mistral's tool call ids: 9 random letters and digits (mistral-common refuses others).
pub fn mistral_call_id() -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..9)
        .map(|_| ALNUM[rng.random_range(0..ALNUM.len())] as char)
        .collect()
}

/// The first delta of a call: its id, type and name (vLLM's `DeltaToolCall`, unset fields
/// left out).
fn start_delta(index: usize, id: String, name: &str, arguments: Option<String>) -> Value {
    let mut function = Map::new();
    function.insert("name".into(), name.into());
    if let Some(a) = arguments {
        function.insert("arguments".into(), a.into());
    }
    json!({"index": index, "type": "function", "id": id, "function": function})
}

fn args_delta(index: usize, arguments: String) -> Value {
    json!({"index": index, "function": {"arguments": arguments}})
}

/// A delta message (`choices[].delta`) with only tool calls.
fn calls_message(calls: Vec<Value>) -> Option<Value> {
    (!calls.is_empty()).then(|| json!({ "tool_calls": calls }))
}

/// A delta message with tool calls and `content: null`, as vLLM 0.32 streams the calls of
/// hermes answers and of `tool_choice` "required" / named (checked side by side:
/// `benches/vllm_diff`).
fn calls_message_null_content(calls: Vec<Value>) -> Option<Value> {
    (!calls.is_empty()).then(|| json!({ "content": null, "tool_calls": calls }))
}

fn content_message(text: String) -> Value {
    json!({ "content": text })
}

/// The `--tool-call-parser` names tpuserve implements.
pub const PARSERS: &[&str] = &["llama3_json", "llama4_json", "hermes", "mistral"];

/// vLLM 0.32's other registered parser names: refused by name at start-up.
pub const VLLM_ONLY_PARSERS: &[&str] = &[
    "apertus",
    "cohere_command3",
    "cohere_command4",
    "deepseek_v3",
    "deepseek_v31",
    "deepseek_v32",
    "deepseek_v4",
    "deepseek_v41",
    "dots",
    "ernie45",
    "functiongemma",
    "gemma4",
    "gigachat3",
    "glm45",
    "glm47",
    "granite",
    "granite-20b-fc",
    "granite4",
    "hf",
    "hunyuan_a13b",
    "hy_v3",
    "hy_v4",
    "inkling",
    "internlm",
    "jamba",
    "k2_horizon",
    "kimi_k2",
    "kimi_k3",
    "lfm2",
    "ling3",
    "llama4_pythonic",
    "longcat",
    "mimo",
    "minicpm5",
    "minimax_m2",
    "minimax_m3",
    "muse_glimmer",
    "olmo3",
    "openai",
    "phi4_mini_json",
    "plamo3",
    "poolside_v1",
    "pythonic",
    "qwen3_coder",
    "qwen3_json",
    "qwen3_xml",
    "seed_oss",
    "step3",
    "step3p5",
    "xlam",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParserKind {
    Llama3Json,
    Hermes,
    /// `v11`: the tokenizer has `[ARGS]` (`[TOOL_CALLS]name[ARGS]{...}`); else the
    /// pre-v11 `[TOOL_CALLS][{"name": ..., "arguments": ...}]`.
    Mistral {
        v11: bool,
    },
}

/// Why `--tool-call-parser` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ParserError {
    #[error(
        "--tool-call-parser {0} is not supported by tpuserve (supported: {list})",
        list = PARSERS.join(", ")
    )]
    Unsupported(String),
    #[error("--tool-call-parser {name} cannot be used with the tokenizer of '{model}': {why}")]
    Tokenizer {
        name: String,
        model: String,
        why: String,
    },
}

impl ParserKind {
    /// The parser for a `--tool-call-parser` name, checked against the tokenizer as vLLM's
    /// `validate_parser_tokenizer` does at start-up (its marker tokens must exist).
    pub fn new(
        name: &str,
        model: &str,
        has_token: impl Fn(&str) -> bool,
    ) -> Result<Self, ParserError> {
        let missing = |why: &str| ParserError::Tokenizer {
            name: name.into(),
            model: model.into(),
            why: why.into(),
        };
        match name {
            "llama3_json" | "llama4_json" => {
                if !has_token(llama::BOT) {
                    return Err(missing(
                        "Llama3JsonToolParser could not locate the bot token '<|python_tag|>' \
                         in the tokenizer.",
                    ));
                }
                Ok(ParserKind::Llama3Json)
            }
            "hermes" => Ok(ParserKind::Hermes),
            "mistral" => {
                if !has_token(mistral::BOT) {
                    return Err(missing(
                        "Mistral parser could not locate the tool call token in the tokenizer!",
                    ));
                }
                Ok(ParserKind::Mistral {
                    v11: has_token(mistral::ARGS),
                })
            }
            other => Err(ParserError::Unsupported(other.into())),
        }
    }

    /// Calls read from a whole answer (vLLM's `extract_tool_calls`).
    pub fn extract(self, text: &str) -> Extracted {
        match self {
            ParserKind::Llama3Json => llama::extract(text),
            ParserKind::Hermes => hermes::extract(text),
            ParserKind::Mistral { v11 } => mistral::extract(text, v11),
        }
    }

    /// The parser keeps special tokens in the text it reads (vLLM's hermes and mistral
    /// `adjust_request` clear `skip_special_tokens` when tools may be called: their markers
    /// are special tokens in some tokenizers).
    pub fn keeps_special_tokens(self) -> bool {
        !matches!(self, ParserKind::Llama3Json)
    }

    pub fn streamer(self) -> Streamer {
        match self {
            ParserKind::Llama3Json => Streamer::Llama(llama::Stream::default()),
            ParserKind::Hermes => Streamer::Hermes(hermes::Stream::default()),
            ParserKind::Mistral { v11 } => Streamer::Mistral(mistral::Stream::new(v11)),
        }
    }
}

/// One choice's streaming extractor: fed the text deltas in order, it answers each with the
/// delta message to send (`None`: nothing to send yet).
pub enum Streamer {
    Llama(llama::Stream),
    Hermes(hermes::Stream),
    Mistral(mistral::Stream),
    Named(choice::NamedStream),
    Required(choice::RequiredStream),
}

impl Streamer {
    pub fn push(&mut self, delta: &str) -> Option<Value> {
        match self {
            Streamer::Llama(s) => s.push(delta),
            Streamer::Hermes(s) => s.push(delta),
            Streamer::Mistral(s) => s.push(delta),
            Streamer::Named(s) => s.push(delta),
            Streamer::Required(s) => s.push(delta),
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// (name, arguments) of each extracted call.
    pub fn calls(e: &Extracted) -> Vec<(&str, &str)> {
        e.calls
            .iter()
            .map(|c| (c.name.as_str(), c.arguments.as_str()))
            .collect()
    }

    /// Assembles streamed deltas as a client does: content concatenated, per call index
    /// the id and name of its first delta and its argument fragments concatenated.
    pub fn assemble(deltas: &[Value]) -> (String, Vec<(String, String, String)>) {
        let mut content = String::new();
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for d in deltas {
            if let Some(c) = d.get("content").and_then(Value::as_str) {
                content.push_str(c);
            }
            for tc in d
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = tc["index"].as_u64().unwrap() as usize;
                if let Some(id) = tc.get("id").and_then(Value::as_str) {
                    assert_eq!(i, calls.len(), "calls start in order: {deltas:?}");
                    assert_eq!(tc["type"], "function");
                    let name = tc["function"]["name"].as_str().unwrap().to_string();
                    calls.push((id.to_string(), name, String::new()));
                } else {
                    assert!(tc["function"].get("name").is_none());
                }
                if let Some(a) = tc["function"].get("arguments").and_then(Value::as_str) {
                    calls[i].2.push_str(a);
                }
            }
        }
        (content, calls)
    }

    /// Streams `text` cut at every char boundary (two deltas), and char by char, and checks
    /// each assembly against the whole-output extraction.
    pub fn check_streaming(kind: ParserKind, text: &str) {
        let whole = kind.extract(text);
        let want_calls: Vec<(String, String)> = whole
            .calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        let mut cuts: Vec<Vec<&str>> = text
            .char_indices()
            .map(|(i, _)| vec![&text[..i], &text[i..]])
            .collect();
        cuts.push(
            text.char_indices()
                .map(|(i, c)| &text[i..i + c.len_utf8()])
                .collect(),
        );
        for pieces in cuts {
            let mut s = kind.streamer();
            let deltas: Vec<Value> = pieces.iter().filter_map(|p| s.push(p)).collect();
            let (content, calls) = assemble(&deltas);
            let got: Vec<(String, String)> = calls
                .iter()
                .map(|(_, n, a)| (n.clone(), a.clone()))
                .collect();
            assert_eq!(got, want_calls, "{pieces:?}");
            assert_eq!(
                content,
                whole.content.clone().unwrap_or_default(),
                "{pieces:?}"
            );
        }
    }
}
