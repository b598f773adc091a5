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

pub fn spec() -> Value {
    let s = |v: schemars::Schema| serde_json::to_value(v).unwrap_or(Value::Null);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "tpuserve", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/completions": {"post": op("Create completion", Some(s(schema_for!(CompletionRequest))))},
            "/v1/chat/completions": {"post": op("Create chat completion", Some(s(schema_for!(ChatCompletionRequest))))},
            "/v1/models": {"get": op("Show available models", None)},
            "/health": {"get": op("Health check", None)},
            "/ping": {"get": op("Ping", None), "post": op("Ping", None)},
            "/version": {"get": op("Show version", None)},
            "/tokenize": {"post": op("Tokenize", Some(s(schema_for!(TokenizeRequest))))},
            "/detokenize": {"post": op("Detokenize", Some(s(schema_for!(DetokenizeRequest))))},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        }
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
