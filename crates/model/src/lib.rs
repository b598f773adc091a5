//! Everything tpuserve knows about a model before it touches a device: the architecture
//! description (`config`), where the weights come from (`safetensors`, `gguf`), the tokenizer
//! and the chat template. Runners consume [`LoadedModel`]; nothing here knows about devices.

pub mod chat_template;
pub mod config;
pub mod dequant;
pub mod dummy;
pub mod error;
pub mod gguf;
pub mod loader;
pub mod locate;
pub mod safetensors_source;
pub mod tensor;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling};
pub use dequant::GgmlType;
pub use error::ModelError;
pub use loader::{load_model, load_model_with, LoadFormat, LoadedModel, ModelFormat};
pub use tensor::{DType, HostTensor, QuantTensor, WeightSource};
pub use tokenizer::Tokenizer;
