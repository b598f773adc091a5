//! Turning OpenAI chat messages into a prompt with the model's chat template.

use tpuserve_model::chat_template::RenderOptions;
use tpuserve_model::ChatMessage;

use crate::error::ApiError;
use crate::protocol::ChatMessageIn;
use crate::state::AppState;

const ROLES: &[&str] = &["system", "user", "assistant", "tool", "developer"];

/// Content as templates expect it: a string; text parts are joined with newlines as vLLM does.
fn content_text(
    i: usize,
    content: &Option<serde_json::Value>,
) -> Result<serde_json::Value, ApiError> {
    use serde_json::Value;
    match content {
        None | Some(Value::Null) => Ok(Value::Null),
        Some(Value::String(s)) => Ok(Value::String(s.clone())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::new();
            for p in parts {
                let kind = p.get("type").and_then(|t| t.as_str());
                match (kind, p.get("text").and_then(|t| t.as_str())) {
                    (Some("text"), Some(t)) => texts.push(t.to_string()),
                    (Some("text"), None) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: a text content part needs a string `text`"),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: content part type `{other}` is not supported by this text-only model"),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: every content part needs a `type`"),
                        ))
                    }
                }
            }
            Ok(Value::String(texts.join("\n")))
        }
        Some(_) => Err(ApiError::invalid_param(
            "messages",
            format!("messages[{i}].content must be a string or an array of content parts"),
        )),
    }
}

pub struct ChatPromptOptions<'a> {
    pub add_generation_prompt: Option<bool>,
    pub continue_final_message: Option<bool>,
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub tools: Option<&'a serde_json::Value>,
    pub documents: Option<&'a serde_json::Value>,
}

/// Renders the conversation to the prompt text.
pub fn render(
    st: &AppState,
    messages: &[ChatMessageIn],
    o: &ChatPromptOptions,
) -> Result<String, ApiError> {
    let tmpl = st.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "this model has no chat template; pass --chat-template or use /v1/completions",
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    let cont = o.continue_final_message.unwrap_or(false);
    let add_gen = o.add_generation_prompt.unwrap_or(!cont);
    if cont && add_gen {
        return Err(ApiError::invalid_param(
            "continue_final_message",
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid_param(
                "messages",
                format!(
                    "messages[{i}]: unknown role `{}` (system, user, assistant, tool)",
                    m.role
                ),
            ));
        }
        let mut cm = ChatMessage::new(&m.role, "");
        cm.content = content_text(i, &m.content)?;
        if let Some(tc) = &m.tool_calls {
            cm.extra.insert("tool_calls".into(), tc.clone());
        }
        if let Some(id) = &m.tool_call_id {
            cm.extra.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(n) = &m.name {
            cm.extra.insert("name".into(), n.clone().into());
        }
        msgs.push(cm);
    }
    let opts = RenderOptions {
        add_generation_prompt: add_gen,
        tools: o.tools.cloned(),
        documents: o.documents.cloned(),
        extra: o.kwargs.cloned().unwrap_or_default(),
        now: None,
    };
    let mut text = tmpl
        .render(&msgs, &opts)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    if cont {
        // Cut after the last message's content so the model continues it.
        if let Some(last) = msgs.last().and_then(|m| m.content.as_str()) {
            if let Some(pos) = text.rfind(last) {
                text.truncate(pos + last.len());
            }
        }
    }
    Ok(text)
}
