//! `/openapi.json`: an OpenAPI 3.1 document whose request schemas are generated from the
//! request types themselves (schemars), so the document cannot drift from what is parsed.

use axum::Json;
use schemars::schema_for;
use serde_json::{json, Value};

use crate::protocol::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn op(summary: &str, request: Option<Value>) -> Value {
    let mut o = json!({
        "summary": summary,
        "responses": {
            "200": {"description": "Successful Response", "content": {"application/json": {"schema": {}}}},
            "400": {"description": "Bad request (OpenAI error object)"},
        }
    });
    if let Some(r) = request {
        o["requestBody"] = body(r);
    }
    o
}

/// Moves a schema's `$defs` into `components/schemas` and points its `$ref`s there: schemars
/// refers to `#/$defs/…`, which inside an OpenAPI document resolves against the document root.
fn hoist_defs(mut schema: Value, components: &mut serde_json::Map<String, Value>) -> Value {
    if let Some(Value::Object(defs)) = schema.as_object_mut().and_then(|o| o.remove("$defs")) {
        for (name, def) in defs {
            components.insert(name, def);
        }
    }
    schema.as_object_mut().map(|o| o.remove("$schema"));
    rewrite_refs(&mut schema);
    schema
}

fn rewrite_refs(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref") {
                if let Some(name) = r.strip_prefix("#/$defs/") {
                    *r = format!("#/components/schemas/{name}");
                }
            }
            o.values_mut().for_each(rewrite_refs);
        }
        Value::Array(a) => a.iter_mut().for_each(rewrite_refs),
        _ => {}
    }
}

pub fn spec() -> Value {
    let mut components = serde_json::Map::new();
    let mut s = |v: schemars::Schema| {
        let v = serde_json::to_value(v).unwrap_or(Value::Null);
        hoist_defs(v, &mut components)
    };
    let completion = s(schema_for!(CompletionRequest));
    let chat = s(schema_for!(ChatCompletionRequest));
    let tokenize = s(schema_for!(TokenizeRequest));
    let detokenize = s(schema_for!(DetokenizeRequest));
    for def in components.values_mut() {
        rewrite_refs(def);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tpuserve", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/completions": {"post": op("Create completion", Some(completion))},
            "/v1/chat/completions": {"post": op("Create chat completion", Some(chat))},
            "/v1/models": {"get": op("Show available models", None)},
            "/health": {"get": op("Health check", None)},
            "/ping": {"get": op("Ping", None), "post": op("Ping", None)},
            "/version": {"get": op("Show version", None)},
            "/load": {"get": op("Server load (requests in flight)", None)},
            "/tokenize": {"post": op("Tokenize", Some(tokenize))},
            "/detokenize": {"post": op("Detokenize", Some(detokenize))},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": components},
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
