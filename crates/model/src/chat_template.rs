//! Chat templates: the model's Jinja template rendered with minijinja in the environment Hugging
//! Face transformers gives it (trim/lstrip blocks, `raise_exception`, `strftime_now`, Python
//! string methods). The sandbox has no loader and no filesystem or environment access.

use chrono::NaiveDateTime;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JValue};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ModelError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or content parts as the OpenAI API sends them; passed to the template as is.
    /// Absent for assistant messages that only carry `tool_calls`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: Value::String(content.into()),
            extra: Map::new(),
        }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// The Jinja source (reported by `/tokenizer_info`).
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// Everything a template may look at besides the messages.
#[derive(Default, Clone)]
pub struct RenderOptions {
    pub add_generation_prompt: bool,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    /// `chat_template_kwargs` from the request, merged into the context.
    pub extra: Map<String, Value>,
    /// Fixed clock for `strftime_now` (tests); `None` = local time now.
    pub now: Option<NaiveDateTime>,
}

fn raise_exception(msg: String) -> Result<JValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ModelError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        opts: &RenderOptions,
    ) -> Result<String, ModelError> {
        let now = opts
            .now
            .unwrap_or_else(|| chrono::Local::now().naive_local());
        let mut env = self.env.clone();
        env.add_function(
            "strftime_now",
            move |fmt: String| -> Result<String, JinjaError> {
                use std::fmt::Write;
                let mut out = String::new();
                write!(out, "{}", now.format(&fmt)).map_err(|_| {
                    JinjaError::new(
                        ErrorKind::InvalidOperation,
                        format!("bad strftime format `{fmt}`"),
                    )
                })?;
                Ok(out)
            },
        );
        let mut ctx = Map::new();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).unwrap_or_default(),
        );
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(opts.add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::String(self.bos_token.clone()));
        ctx.insert("eos_token".into(), Value::String(self.eos_token.clone()));
        // HF passes these as None when absent, and templates test `tools is not none`.
        ctx.insert("tools".into(), opts.tools.clone().unwrap_or(Value::Null));
        ctx.insert(
            "documents".into(),
            opts.documents.clone().unwrap_or(Value::Null),
        );
        for (k, v) in &opts.extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = env
            .get_template("chat")
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        tmpl.render(JValue::from_serialize(&ctx)).map_err(|e| {
            let detail = e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.to_string());
            ModelError::ChatTemplate(detail)
        })
    }
}

/// `tojson` as Jinja2 in transformers renders it (`json.dumps(..., ensure_ascii=False)`):
/// `", "` and `": "` separators, key order kept, no HTML escaping (minijinja's own escapes
/// `<>&'`, which would change prompts).
fn python_tojson(value: JValue, kwargs: minijinja::value::Kwargs) -> Result<JValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let v = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    write_python_json(&v, indent, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn write_python_json(v: &Value, indent: Option<usize>, depth: usize, out: &mut String) {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_python_json(item, indent, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(0.0);
            // Python prints floats with a fractional part (1.0, not 1).
            if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&n.to_string());
            }
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Picks the template from `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// named templates of which `default` wins).
pub fn template_from_tokenizer_config(cfg: &Value) -> Option<String> {
    match cfg.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |n: &str| {
                items.iter().find_map(|i| {
                    (i.get("name")?.as_str()? == n)
                        .then(|| i.get("template")?.as_str().map(str::to_string))?
                })
            };
            named("default").or_else(|| {
                items
                    .first()
                    .and_then(|i| i.get("template")?.as_str().map(str::to_string))
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_exception_surfaces_the_message() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let e = t
            .render(&[], &RenderOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "", "").unwrap();
        let mut extra = Map::new();
        extra.insert(
            "x".into(),
            serde_json::json!({"b": [1, 2.5, "<a&b>"], "a": {}}),
        );
        let opts = RenderOptions {
            extra,
            ..Default::default()
        };
        assert_eq!(
            t.render(&[], &opts).unwrap(),
            "{\"b\": [1, 2.5, \"<a&b>\"], \"a\": {}}|{\n  \"b\": [\n    1,\n    2.5,\n    \"<a&b>\"\n  ],\n  \"a\": {}\n}"
        );
    }

    #[test]
    fn strftime_now_uses_the_injected_clock() {
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "").unwrap();
        let now = chrono::NaiveDate::from_ymd_opt(2024, 7, 26)
            .unwrap()
            .and_hms_opt(0, 0, 0);
        let opts = RenderOptions {
            now,
            ..Default::default()
        };
        assert_eq!(t.render(&[], &opts).unwrap(), "26 Jul 2024");
    }

    #[test]
    fn templates_cannot_reach_files_or_env() {
        for src in [
            "{% include '/etc/passwd' %}",
            "{{ env.HOME }}{{ self.__init__ }}",
        ] {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let out = t.render(&[], &RenderOptions::default());
            assert!(out.as_deref().unwrap_or("").is_empty(), "{src} -> {out:?}");
        }
    }
}
