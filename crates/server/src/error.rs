//! One error type for the HTTP surface, rendered in the OpenAI shape vLLM uses:
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    /// The error `type` where it is not the status's usual name (vLLM 0.32 reports request
    /// validation errors as "Bad Request").
    pub type_name: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
            type_name: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// A refusal vLLM 0.32 raises as a `VLLMValidationError`: its message ends with
    /// " (parameter=P)" or " (parameter=P, value=V)" (`value` in Python's `str` form).
    pub fn vllm(param: &str, message: impl std::fmt::Display, value: Option<&str>) -> Self {
        let suffix = tpuserve_engine::pyfmt::vllm_suffix(param, value);
        Self::invalid_param(param, format!("{message}{suffix}"))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// The OpenAI error `type` for a status, as vLLM names them.
    pub fn error_type(&self) -> &'static str {
        if let Some(t) = self.type_name {
            return t;
        }
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLarge",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ if self.status.is_server_error() => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.error_type(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

/// The engine gate's refusals: a 400 naming the field where the error has one.
impl From<tpuserve_engine::RequestError> for ApiError {
    fn from(r: tpuserve_engine::RequestError) -> Self {
        use tpuserve_engine::RequestError as R;
        match &r {
            // vLLM's own messages already name the parameter.
            R::InvalidParameter { param, reason } => ApiError::invalid_param(param, reason),
            R::Unnamed { reason, .. } => ApiError::bad_request(reason),
            // vLLM names no parameter for a prompt's id (`param: null`).
            R::TokenOutOfRange {
                param: "prompt", ..
            } => ApiError::bad_request(r.to_string()),
            R::TokenOutOfRange { param, .. } => ApiError::invalid_param(param, r.to_string()),
            R::EmptyPrompt => ApiError::invalid_param("prompt", r.to_string()),
            _ => ApiError::bad_request(r.to_string()),
        }
    }
}

impl From<tpuserve_engine::EngineError> for ApiError {
    fn from(e: tpuserve_engine::EngineError) -> Self {
        match e {
            tpuserve_engine::EngineError::Request(r) => r.into(),
            tpuserve_engine::EngineError::Stopped => {
                ApiError::unavailable("the engine has stopped")
            }
            other => ApiError::internal(other.to_string()),
        }
    }
}
