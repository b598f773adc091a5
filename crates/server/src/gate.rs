//! The request gate as a pure function of a parsed body: prompts tokenized, fields converted,
//! the chat template applied, and every prompt's request passed through the engine's own
//! validation (`RequestLimits::validate`, a pure function of the engine's limits). Nothing
//! here touches the running engine, so the fuzz targets (`tests/fuzz.rs`) drive exactly the
//! code the handlers run.

use std::borrow::Cow;

use serde_json::{Map, Value};
use tpuserve_engine::ValidatedRequest;
use tpuserve_model::{ChatTemplate, Tokenizer};

use crate::chat::{self, ChatPromptOptions};
use crate::error::ApiError;
use crate::protocol::{ChatCompletionRequest, CompletionRequest, Prompt, ReasoningEffort};
use crate::validate::{self, Limits, Validated};

/// What the gate needs from the server's state.
pub struct GateContext<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    pub limits: Limits,
    /// `--trust-request-chat-template`: a request may bring its own `chat_template`.
    pub trust_request_chat_template: bool,
    /// `--default-chat-template-kwargs`.
    pub default_kwargs: Option<&'a Map<String, Value>>,
    /// `--enable-auto-tool-choice` with `--tool-call-parser`.
    pub tool_parser: Option<crate::tools::ParserKind>,
    /// `--exclude-tools-when-tool-choice-none`.
    pub exclude_tools_when_tool_choice_none: bool,
    /// `--tool-strict-level`.
    pub tool_strict_level: crate::tools::tags::StrictLevel,
}

/// A `/v1/completions` request that passed the gate: one (engine request, text) per prompt.
pub struct CompletionInput {
    pub prompts: Vec<(ValidatedRequest, String)>,
    pub params: Validated,
    /// `echo` with `logprobs`: the prompt's logprobs are computed (this many alternatives)
    /// to show it with the answer.
    pub echo_logprobs: Option<usize>,
    /// Whether the response shows `prompt_logprobs` (the request asked for them; echo alone
    /// computes them without showing that field).
    pub show_prompt_logprobs: bool,
}

pub fn completion(ctx: &GateContext, req: &CompletionRequest) -> Result<CompletionInput, ApiError> {
    if req.suffix.is_some() {
        return Err(ApiError::invalid_param(
            "suffix",
            // vLLM 0.32's words: only models with fill-in-the-middle rendering take it.
            "suffix is only supported for models with FIM completion rendering",
        ));
    }
    let add_special = req.add_special_tokens.unwrap_or(true);
    let engine = &ctx.limits.engine;
    let to_ids = |v: &[i64]| -> Result<(Vec<u32>, String), ApiError> {
        let ids = v
            .iter()
            .map(|&t| validate::token_id("prompt", t, engine))
            .collect::<Result<Vec<_>, _>>()?;
        let text = ctx.tokenizer.decode(&ids, false).unwrap_or_default();
        Ok((ids, text))
    };
    let enc = |s: &str| -> Result<(Vec<u32>, String), ApiError> {
        let ids = ctx
            .tokenizer
            .encode(s, add_special)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?;
        Ok((ids, s.to_string()))
    };
    let mut prompts: Vec<(Vec<u32>, String)> = match &req.prompt {
        Prompt::Text(s) => vec![enc(s)?],
        Prompt::Texts(v) => v.iter().map(|s| enc(s)).collect::<Result<_, _>>()?,
        Prompt::Tokens(v) => vec![to_ids(v)?],
        Prompt::TokenLists(v) => v.iter().map(|x| to_ids(x)).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    let mut params = validate::sampling(
        "CompletionRequest",
        &req.sampling,
        ("max_tokens", req.max_tokens),
        req.logprobs,
        1.0,
        &ctx.limits,
    )?;
    params.sampling.bad_words =
        validate::bad_words(req.sampling.bad_words.as_deref(), ctx.tokenizer)?;
    if req.echo == Some(true)
        && req.max_tokens == Some(0)
        && !params.sampling.logprob_token_ids.is_empty()
    {
        return Err(ApiError::invalid_param(
            "logprob_token_ids",
            "`logprob_token_ids` is not supported when `echo=True` and `max_tokens=0` because \
             no output tokens are generated.",
        ));
    }
    if let Some(t) = params.truncation {
        for (ids, text) in &mut prompts {
            if t.apply(ids) {
                // The prompt is what the model sees (echo shows the kept part).
                *text = ctx.tokenizer.decode(ids, false).unwrap_or_default();
            }
        }
    }
    let echo_logprobs = params.sampling.logprobs.filter(|_| req.echo == Some(true));
    // vLLM computes `echo` + `logprobs` as `prompt_logprobs` (when those are not asked for
    // themselves) and so returns them in the choice too.
    let show_prompt_logprobs = params.sampling.prompt_logprobs.is_some() || echo_logprobs.is_some();
    if let Some(k) = echo_logprobs {
        let p = &mut params.sampling.prompt_logprobs;
        *p = Some(p.unwrap_or(0).max(k));
    }
    let prompts = prompts
        .into_iter()
        .map(|(ids, text)| Ok((params.engine_request(engine, ids)?, text)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(CompletionInput {
        prompts,
        params,
        echo_logprobs,
        show_prompt_logprobs,
    })
}

/// A `/v1/chat/completions` request that passed the gate: the rendered prompt and its engine
/// request.
pub struct ChatInput {
    pub request: ValidatedRequest,
    pub text: String,
    pub params: Validated,
    /// Top alternatives asked for when `logprobs` is true.
    pub logprobs: Option<i64>,
    /// How tool calls are read from the answer (`None`: plain content).
    pub tool_mode: Option<crate::tools::ToolMode>,
}

/// The chat template's extra variables: `--default-chat-template-kwargs` under the
/// request's `chat_template_kwargs`, and with `reasoning_effort` that value plus
/// `enable_thinking` (effort other than "none") unless the request's kwargs set
/// `enable_thinking` — vLLM's `build_chat_params` (templates that do not use them are
/// unaffected; others, e.g. Qwen3's or Gemma's, switch thinking on or off).
pub fn template_kwargs<'a>(
    defaults: Option<&'a Map<String, Value>>,
    user: Option<&'a Map<String, Value>>,
    effort: Option<ReasoningEffort>,
) -> Option<Cow<'a, Map<String, Value>>> {
    let base = match (defaults, user) {
        (None, u) => u.map(Cow::Borrowed),
        (Some(d), None) => Some(Cow::Borrowed(d)),
        (Some(d), Some(u)) => {
            let mut merged = d.clone();
            merged.extend(u.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(Cow::Owned(merged))
        }
    };
    let Some(effort) = effort else {
        return base;
    };
    let mut kwargs = base.map(Cow::into_owned).unwrap_or_default();
    if !user.is_some_and(|u| u.contains_key("enable_thinking")) {
        kwargs.insert(
            "enable_thinking".into(),
            Value::Bool(effort != ReasoningEffort::None),
        );
    }
    kwargs.insert("reasoning_effort".into(), effort.as_str().into());
    Some(Cow::Owned(kwargs))
}

pub fn chat(ctx: &GateContext, req: &ChatCompletionRequest) -> Result<ChatInput, ApiError> {
    // vLLM 0.32's request model: a negative count other than -1 first, then a count that
    // asks for alternatives (-1 or > 0) without `logprobs`.
    if let Some(n) = req.top_logprobs {
        if n < -1 {
            return Err(ApiError::vllm(
                "top_logprobs",
                "`top_logprobs` must be a positive value or -1.",
                Some(&n.to_string()),
            ));
        }
        if n != 0 && !req.logprobs.unwrap_or(false) {
            return Err(ApiError::vllm(
                "top_logprobs",
                "when using `top_logprobs`, `logprobs` must be set to true.",
                None,
            ));
        }
    }
    let (tool_mode, tools_for_template) = tool_choice(ctx, req)?;
    // vLLM refuses a request's own template unless the server trusts them: a template is code
    // run on the server (sandboxed here, but it can still cost time and memory).
    let own = match &req.chat_template {
        None => None,
        Some(_) if !ctx.trust_request_chat_template => {
            return Err(ApiError::invalid_param(
                "chat_template",
                "Chat template is passed with request, but --trust-request-chat-template is \
                 not set. Refused request with untrusted chat template.",
            ))
        }
        Some(src) => Some(
            ChatTemplate::new(
                src,
                ctx.tokenizer.bos_token.as_deref().unwrap_or(""),
                ctx.tokenizer.eos_token.as_deref().unwrap_or(""),
            )
            .map_err(|e| ApiError::invalid_param("chat_template", e.to_string()))?,
        ),
    };
    if req.return_prompt_text == Some(true) {
        return Err(ApiError::invalid_param(
            "return_prompt_text",
            "return_prompt_text is not supported by tpuserve: the rendered prompt is not \
             returned (POST /tokenize renders it)",
        ));
    }
    let effort = match req.reasoning_effort.as_deref() {
        None => None,
        Some(e) => Some(ReasoningEffort::parse(e).ok_or_else(|| {
            let expected = "'none', 'minimal', 'low', 'medium', 'high', 'xhigh' or 'max'";
            crate::numbers::bound_error(
                crate::numbers::FieldError::new(
                    "reasoning_effort",
                    "literal_error",
                    format!("Input should be {expected}"),
                    e,
                )
                .with_ctx("expected", tpuserve_engine::pyfmt::py_str(expected)),
            )
        })?),
    };
    let kwargs = template_kwargs(
        ctx.default_kwargs,
        req.chat_template_kwargs.as_ref(),
        effort,
    );
    let text = chat::render(
        own.as_ref().or(ctx.chat_template),
        &req.messages,
        &ChatPromptOptions {
            add_generation_prompt: req.add_generation_prompt,
            continue_final_message: req.continue_final_message,
            kwargs: kwargs.as_deref(),
            tools: tools_for_template,
            documents: req.documents.as_ref(),
        },
    )?;
    let mut ids = ctx
        .tokenizer
        .encode(&text, req.add_special_tokens.unwrap_or(false))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let logprobs = if req.logprobs.unwrap_or(false) {
        Some(req.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let max_tokens = match req.max_completion_tokens {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", req.max_tokens),
    };
    // vLLM 0.32 computes and returns the prompt's logprobs for a whole (not streamed) chat
    // answer with `echo`, `top_logprobs` alternatives each (0 by default), unless the request
    // set `prompt_logprobs` itself (`ChatCompletionRequest.to_sampling_params`; its beam
    // search parameters carry none).
    let echoed;
    let fields = if req.echo == Some(true)
        && req.sampling.prompt_logprobs.is_none()
        && req.sampling.stream != Some(true)
        && req.sampling.unimplemented.use_beam_search != Some(true)
    {
        echoed = crate::protocol::SamplingFields {
            prompt_logprobs: Some(req.top_logprobs.unwrap_or(0)),
            ..req.sampling.clone()
        };
        &echoed
    } else {
        &req.sampling
    };
    let mut params = validate::sampling(
        "ChatCompletionRequest",
        fields,
        max_tokens,
        logprobs,
        1.0,
        &ctx.limits,
    )?;
    params.sampling.bad_words =
        validate::bad_words(req.sampling.bad_words.as_deref(), ctx.tokenizer)?;
    if tool_mode.is_some() && ctx.tool_parser.is_some_and(|p| p.keeps_special_tokens()) {
        params.stop.skip_special_tokens = false;
    }
    if params.beam.is_some() && tool_mode.is_some() {
        return Err(ApiError::invalid_param(
            "tools",
            "tools is not supported together with use_beam_search by tpuserve (tool calls \
             would not be read from the beams)",
        ));
    }
    // Named and required tool choice are enforced by structured output: the answer follows
    // the schema built from the tools' parameters, so the arguments always parse.
    if let Some(schema) = tool_mode.as_ref().and_then(|m| m.schema.clone()) {
        let named = req.tool_choice.as_ref().is_some_and(Value::is_object);
        if named && params.constraint.is_some() {
            return Err(ApiError::bad_request(
                "You can only either use constraints for structured outputs or tools, not both.",
            ));
        }
        params.constraint = Some((
            tpuserve_engine::structured::ConstraintSpec::new(
                tpuserve_engine::structured::GrammarKind::JsonSchema(schema),
            ),
            "tool_choice",
        ));
    }
    // "auto" answers as vLLM 0.32 constrains them with a structural tag (strict tools,
    // `--tool-strict-level`, `parallel_tool_calls: false`).
    if let (Some(mode), Some(tools)) = (&tool_mode, tools_for_template) {
        if let crate::tools::choice::Choice::Auto(parser) = mode.choice {
            if params.constraint.is_none() {
                let lark = crate::tools::tags::auto_grammar(
                    parser,
                    tools,
                    ctx.tool_strict_level,
                    mode.single_call,
                )?;
                if let Some(lark) = lark {
                    params.constraint = Some((
                        tpuserve_engine::structured::ConstraintSpec::new(
                            tpuserve_engine::structured::GrammarKind::Grammar(lark),
                        ),
                        "tools",
                    ));
                }
            } else if let Some((spec, field)) = params.constraint.take() {
                // Structured outputs beside constrained calls: the answer is the calls (in
                // their "required" form) or the structured output, as vLLM 0.32's `OrFormat`.
                use tpuserve_engine::structured::GrammarKind;
                let calls = crate::tools::tags::required_calls(
                    parser,
                    tools,
                    ctx.tool_strict_level,
                    mode.single_call,
                )?;
                params.constraint = Some(match (calls, &spec.kind) {
                    (None, _) => (spec, field),
                    (
                        Some(calls),
                        GrammarKind::JsonSchema(_)
                        | GrammarKind::JsonObject
                        | GrammarKind::Choice(_),
                    ) => {
                        let output = Box::new(spec.kind.clone());
                        let kind = GrammarKind::ToolsOr { calls, output };
                        (
                            tpuserve_engine::structured::ConstraintSpec { kind, ..spec },
                            field,
                        )
                    }
                    (Some(_), _) => {
                        // vLLM needs xgrammar to take the output's form here too.
                        return Err(ApiError::invalid_param(
                            "tools",
                            "tools whose calls are constrained (a tool with `strict: true`, \
                             --tool-strict-level function / parameter) together with a regex \
                             or grammar structured output are not supported by tpuserve (a \
                             JSON schema, a JSON object or a choice is)",
                        ));
                    }
                });
            }
        }
    }
    if let Some(t) = params.truncation {
        t.apply(&mut ids);
    }
    let request = params.engine_request(&ctx.limits.engine, ids)?;
    Ok(ChatInput {
        request,
        text,
        params,
        logprobs,
        tool_mode,
    })
}

/// `tools` / `tool_choice` / `parallel_tool_calls` checked as vLLM's request model and
/// renderer check them: how calls are read from the answer, and the tools the chat template
/// gets. Without tools and with `tool_choice` absent, "auto" is meant (vLLM's default),
/// which needs the tool-call parser.
fn tool_choice<'r>(
    ctx: &GateContext,
    req: &'r ChatCompletionRequest,
) -> Result<(Option<crate::tools::ToolMode>, Option<&'r Value>), ApiError> {
    use crate::tools::choice::{required_or_named_schema, Choice};
    let tools = req.tools.as_ref().filter(|t| !t.is_null());
    if tools.is_some_and(|t| t.as_array().is_some_and(Vec::is_empty)) {
        return Err(ApiError::vllm(
            "tools",
            "`tools` must not be an empty array. Either provide at least one tool or omit the \
             field entirely.",
            None,
        ));
    }
    let absent_default = Value::String("auto".into());
    let choice = match (&req.tool_choice, tools) {
        (None, Some(_)) => &absent_default,
        (None, None) => &Value::Null,
        (Some(c), _) => c,
    };
    if choice == "none" {
        let shown = tools.filter(|_| !ctx.exclude_tools_when_tool_choice_none);
        return Ok((None, shown));
    }
    if !choice.is_null() && tools.is_none() {
        return Err(ApiError::vllm(
            "tool_choice",
            "When using `tool_choice`, `tools` must be set.",
            None,
        ));
    }
    let usage = r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;
    match choice {
        Value::Null => {}
        Value::String(c) if c == "auto" || c == "required" => {}
        Value::Object(o) => {
            let function = o.get("function");
            let Some(f) = function.and_then(Value::as_object) else {
                let shown = function.map_or_else(|| "None".to_string(), Value::to_string);
                return Err(ApiError::vllm(
                    "tool_choice.function",
                    format!("Invalid value for `function`: `{shown}` in `tool_choice`! {usage}"),
                    None,
                ));
            };
            let Some(name) = f.get("name") else {
                return Err(ApiError::vllm(
                    "tool_choice.function.name",
                    format!("Expected field `name` in `function` in `tool_choice`! {usage}"),
                    None,
                ));
            };
            if name.as_str().is_none_or(str::is_empty) {
                let shown = name
                    .as_str()
                    .map_or_else(|| name.to_string(), str::to_string);
                return Err(ApiError::vllm(
                    "tool_choice.function.name",
                    format!("Invalid `name` in `function`: `{shown}` in `tool_choice`! {usage}"),
                    None,
                ));
            }
            let names = tools
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.pointer("/function/name"));
            if !names.into_iter().any(|n| n == name) {
                return Err(ApiError::vllm(
                    "tool_choice",
                    "The tool specified in `tool_choice` does not match any of the specified \
                     `tools`",
                    None,
                ));
            }
        }
        other => {
            let shown = other
                .as_str()
                .map_or_else(|| other.to_string(), str::to_string);
            return Err(ApiError::vllm(
                "tool_choice",
                format!(
                    "Invalid value for `tool_choice`: {shown}! Only named tools, \"none\", \
                     \"auto\" or \"required\" are supported."
                ),
                None,
            ));
        }
    }
    let Some(tools) = tools else {
        return Ok((None, None));
    };
    crate::tools::choice::functions(tools)?;
    let Some(parser) = ctx.tool_parser else {
        // vLLM's renderer: without a tool-call parser nothing needing the answer parsed is
        // served (a null tool_choice renders the tools and answers with content).
        return match choice {
            Value::Null => Ok((None, Some(tools))),
            Value::String(c) if c == "auto" => Err(ApiError::bad_request(
                "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser \
                 to be set",
            )),
            other => {
                let desc = match other {
                    Value::String(c) => format!("\"{c}\""),
                    v => format!(
                        "function \"{}\"",
                        v.pointer("/function/name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                    ),
                };
                Err(ApiError::bad_request(format!(
                    "tool_choice={desc} requires --tool-call-parser to be set"
                )))
            }
        };
    };
    let schema = required_or_named_schema(tools, choice, req.parallel_tool_calls)?;
    let choice = match choice {
        Value::Object(_) => Choice::Named(
            choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ),
        Value::String(c) if c == "required" => Choice::Required,
        _ => Choice::Auto(parser),
    };
    let mode = crate::tools::ToolMode {
        choice,
        single_call: req.parallel_tool_calls == Some(false),
        schema,
    };
    Ok((Some(mode), Some(tools)))
}
