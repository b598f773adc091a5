//! Turning OpenAI chat messages into a prompt with the model's chat template.

use tpuserve_model::chat_template::RenderOptions;
use tpuserve_model::{ChatMessage, ChatTemplate};

use crate::error::ApiError;
use crate::protocol::ChatMessageIn;

/// Content as templates expect it: a string; text parts are joined with newlines as vLLM does,
/// and a missing or null content (an assistant turn that only made tool calls) is `""`, as
/// vLLM's "string" content format gives it: templates that add `message['content']` to a
/// string failed on it (a 400 for every conversation carrying a tool call back).
fn content_text(
    i: usize,
    content: &Option<serde_json::Value>,
) -> Result<serde_json::Value, ApiError> {
    use serde_json::Value;
    match content {
        None | Some(Value::Null) => Ok(Value::String(String::new())),
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

/// Cuts the rendered chat right after the final message's content, so the model continues
/// that message (transformers' rule: templates may trim the content, so its stripped form is
/// looked up, last occurrence first; a template that drops it is an error).
fn cut_after_final_message(text: &mut String, last: &str) -> Result<(), ApiError> {
    let core = last.trim();
    if core.is_empty() {
        return Ok(());
    }
    let pos = text.rfind(core).ok_or_else(|| {
        ApiError::invalid_param(
            "continue_final_message",
            "continue_final_message is set but the final message does not appear in the chat after applying the chat template",
        )
    })?;
    let kept = last.trim_start();
    let end = if text[pos..].starts_with(kept) {
        pos + kept.len()
    } else {
        pos + core.len()
    };
    text.truncate(end);
    Ok(())
}

/// The role of the answer (vLLM's `get_chat_request_role`): `--response-role` after a
/// generation prompt, else (continuing a message) the last message's role.
pub fn response_role(req: &crate::protocol::ChatCompletionRequest, response_role: &str) -> String {
    let cont = req.continue_final_message.unwrap_or(false);
    if req.add_generation_prompt.unwrap_or(!cont) {
        response_role.to_string()
    } else {
        req.messages
            .last()
            .map_or_else(|| response_role.to_string(), |m| m.role.clone())
    }
}

/// Chat `echo` (vLLM): the last message's text when it has the answer's role (the answer
/// continues it), to be prepended to every choice; `None` otherwise.
pub fn echo_text(req: &crate::protocol::ChatCompletionRequest, role: &str) -> Option<String> {
    if req.echo != Some(true) {
        return None;
    }
    let i = req.messages.len().checked_sub(1)?;
    let last = &req.messages[i];
    if last.role != role {
        return None;
    }
    match content_text(i, &last.content).ok()? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s),
        _ => None,
    }
}

/// An assistant message's `tool_calls` as templates expect them (vLLM's
/// `_postprocess_messages`): each call's `arguments` JSON text parsed to an object (text
/// that is not a JSON object becomes `{}`, so the conversation can go on); an empty list is
/// dropped.
fn template_tool_calls(
    role: &str,
    calls: &serde_json::Value,
) -> Result<Option<serde_json::Value>, ApiError> {
    use serde_json::Value;
    let Value::Array(items) = calls else {
        return Ok(Some(calls.clone()));
    };
    if role != "assistant" {
        return Ok(Some(calls.clone()));
    }
    if items.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(call) = item else {
            return Err(ApiError::invalid_param(
                "tool_calls",
                "assistant tool_calls entries must be objects.",
            ));
        };
        let mut call = call.clone();
        let is_function = call.get("type").is_none_or(|t| t == "function");
        let Some(Value::Object(function)) = call.get_mut("function").filter(|_| is_function) else {
            return Err(ApiError::invalid_param(
                "tool_calls",
                "chat completions only support assistant tool_calls of type 'function'.",
            ));
        };
        let args = match function.get("arguments") {
            Some(Value::Object(o)) => Value::Object(o.clone()),
            Some(Value::String(s)) if !s.is_empty() => match serde_json::from_str::<Value>(s) {
                Ok(Value::Object(o)) => Value::Object(o),
                _ => Value::Object(Default::default()),
            },
            _ => Value::Object(Default::default()),
        };
        function.insert("arguments".into(), args);
        out.push(Value::Object(call));
    }
    Ok(Some(Value::Array(out)))
}

/// Developer messages for a template that does not know the role (its source never names
/// `"developer"`), as vLLM 0.32 gives them (`_convert_developer_to_system`,
/// `_consolidate_system_messages`): they become system messages, and then every non-empty
/// system content is joined with blank lines into one system message at the front, the other
/// messages keeping their order. SmolLM2's template rendered "developer" as a turn of its own
/// after its default system prompt.
fn developer_as_system(msgs: &mut Vec<ChatMessage>, template_source: &str) {
    if !msgs.iter().any(|m| m.role == "developer")
        || template_source.contains("\"developer\"")
        || template_source.contains("'developer'")
    {
        return;
    }
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| {
        tracing::info!(
            "the chat template does not know the 'developer' role: developer messages are \
             given to it as system messages (as vLLM does)"
        )
    });
    for m in msgs.iter_mut().filter(|m| m.role == "developer") {
        m.role = "system".into();
        m.extra.remove("tools");
    }
    let systems: Vec<usize> = (0..msgs.len())
        .filter(|&i| msgs[i].role == "system")
        .collect();
    if systems.len() < 2 && systems.iter().all(|&i| i == 0) {
        return;
    }
    let joined: Vec<String> = systems
        .iter()
        .filter_map(|&i| msgs[i].content.as_str().filter(|c| !c.is_empty()))
        .map(str::to_string)
        .collect();
    msgs.retain(|m| m.role != "system");
    msgs.insert(0, ChatMessage::new("system", &joined.join("\n\n")));
}

/// Renders the conversation to the prompt text.
pub fn render(
    template: Option<&ChatTemplate>,
    messages: &[ChatMessageIn],
    o: &ChatPromptOptions,
) -> Result<String, ApiError> {
    let tmpl = template.ok_or_else(|| {
        ApiError::bad_request(
            "this model has no chat template; pass --chat-template or use /v1/completions",
        )
    })?;
    if messages.is_empty() {
        // vLLM's words, and its `param: null`.
        return Err(ApiError::bad_request(
            "Cannot apply chat template to an empty conversation. Provide at least one message.",
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
    // Any role string goes to the template, as in vLLM: custom roles are the template's
    // business (it may render them or raise, which is a 400 below).
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        // vLLM's message types: only an assistant message's content may be null (a left-out
        // content is fine for any role: its custom-role type does not require it).
        if m.role != "assistant" && m.content == Some(serde_json::Value::Null) {
            return Err(ApiError::invalid_param(
                "messages",
                format!(
                    "messages[{i}].content must be a string or an array of content parts: \
                     only an assistant message may have null content"
                ),
            ));
        }
        let mut cm = ChatMessage::new(&m.role, "");
        cm.content = content_text(i, &m.content)?;
        if let Some(tc) = &m.tool_calls {
            if let Some(tc) = template_tool_calls(&m.role, tc)? {
                cm.extra.insert("tool_calls".into(), tc);
            }
        }
        if let Some(id) = &m.tool_call_id {
            cm.extra.insert("tool_call_id".into(), id.clone().into());
        }
        if let Some(n) = &m.name {
            cm.extra.insert("name".into(), n.clone().into());
        }
        msgs.push(cm);
    }
    developer_as_system(&mut msgs, &tmpl.source);
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
        if let Some(last) = msgs.last().and_then(|m| m.content.as_str()) {
            cut_after_final_message(&mut text, last)?;
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::{cut_after_final_message, developer_as_system, template_tool_calls};
    use serde_json::json;
    use tpuserve_model::ChatMessage;

    fn roles_and_contents(msgs: &[ChatMessage]) -> Vec<(String, String)> {
        msgs.iter()
            .map(|m| (m.role.clone(), m.content.as_str().unwrap().to_string()))
            .collect()
    }

    #[test]
    fn developer_messages_become_one_front_system_message_as_vllm() {
        let conv = || {
            vec![
                ChatMessage::new("user", "hi"),
                ChatMessage::new("developer", "Be brief."),
                ChatMessage::new("system", ""),
                ChatMessage::new("system", "No emoji."),
                ChatMessage::new("assistant", "ok"),
            ]
        };
        let mut m = conv();
        developer_as_system(&mut m, "{{ messages }}");
        let want = [
            ("system", "Be brief.\n\nNo emoji."),
            ("user", "hi"),
            ("assistant", "ok"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect();
        assert_eq!(roles_and_contents(&m), want);
        // A template that names the role gets the conversation as sent.
        let mut m = conv();
        developer_as_system(&mut m, "{% if m.role == 'developer' %}{% endif %}");
        assert_eq!(roles_and_contents(&m), roles_and_contents(&conv()));
        // One developer message in front: only renamed.
        let mut m = vec![
            ChatMessage::new("developer", "x"),
            ChatMessage::new("user", "y"),
        ];
        developer_as_system(&mut m, "");
        assert_eq!(m[0].role, "system");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn assistant_tool_call_arguments_reach_templates_as_objects() {
        let calls = json!([
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
            {"id": "c", "function": {"name": "h", "arguments": "[1]"}}
        ]);
        let got = template_tool_calls("assistant", &calls).unwrap().unwrap();
        assert_eq!(got[0]["function"]["arguments"], json!({"x": 1}));
        assert_eq!(got[1]["function"]["arguments"], json!({}));
        assert_eq!(got[2]["function"]["arguments"], json!({}));
        assert_eq!(template_tool_calls("assistant", &json!([])).unwrap(), None);
        assert!(template_tool_calls("assistant", &json!([1])).is_err());
        let typed = json!([{"type": "custom", "function": {"name": "f"}}]);
        assert!(template_tool_calls("assistant", &typed).is_err());
    }

    /// Found by `tests/fuzz.rs`: a final message the template trims (Llama 3.1 does) must not
    /// be looked up with its spaces, or the cut lands anywhere.
    #[test]
    fn continue_final_message_cuts_after_the_trimmed_content() {
        let rendered = "<|user|>\n\nHi there<|eot|><|assistant|>\n\nOnce upon a<|eot|>";
        let mut t = rendered.to_string();
        cut_after_final_message(&mut t, "  Once upon a ").unwrap();
        assert_eq!(t, "<|user|>\n\nHi there<|eot|><|assistant|>\n\nOnce upon a");
        // Whitespace only: nothing to continue from, keep everything.
        let mut t = rendered.to_string();
        cut_after_final_message(&mut t, " ").unwrap();
        assert_eq!(t, rendered);
        // Kept as written when the template keeps the spacing.
        let mut t = "A: x  B: tail ".to_string();
        cut_after_final_message(&mut t, "tail ").unwrap();
        assert_eq!(t, "A: x  B: tail ");
        // A template that drops the message is an error, not a silent prompt.
        let mut t = rendered.to_string();
        assert!(cut_after_final_message(&mut t, "never rendered").is_err());
    }
}
