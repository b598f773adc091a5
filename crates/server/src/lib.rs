//! The `tpuserve` server as a library: the HTTP front end, metrics, CLI commands. The binary
//! (`main.rs`) only parses the command line; benchmarks and tests reach the pieces from here.

pub mod app;
pub mod beam;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod cors;
pub mod echo;
pub mod error;
pub mod fault_injection;
pub mod gate;
pub mod generate;
pub mod generation_config;
pub mod http_server;
pub mod metrics;
pub mod numbers;
pub mod openapi;
pub mod plan;
pub mod protocol;
pub mod serve;
pub mod state;
pub mod streaming;
pub mod structured;
pub mod tls;
pub mod tokenizer_info;
pub mod tools;
pub mod unsupported;
pub mod validate;
pub mod vllm_flags;
