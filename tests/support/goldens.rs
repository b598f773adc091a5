//! The golden files written by Hugging Face transformers (see `../shared/fixtures/README.md`).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Goldens {
    pub cases: Vec<Case>,
    pub batch: Batch,
    pub tokenization: Vec<TokenizationCase>,
    pub chat_template: Vec<ChatTemplateCase>,
}

#[derive(Debug, Deserialize)]
pub struct Batch {
    pub case_names: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Step {
    pub token_id: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

#[derive(Debug, Deserialize)]
pub struct PromptLogprob {
    pub token_id: u32,
    pub logprob: f64,
    pub rank: usize,
    pub top: Vec<(u32, f64)>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub kind: String,
    pub prompt: serde_json::Value,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub messages: Option<Vec<tpuserve_model::ChatMessage>>,
    pub prompt_token_ids: Vec<u32>,
    pub completion_token_ids: Vec<u32>,
    pub completion_text: String,
    pub completion_text_skip_special: String,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub prompt_logprobs: Option<Vec<Option<PromptLogprob>>>,
    pub min_margin_top1_top2: f64,
}

#[derive(Debug, Deserialize)]
pub struct TokenizationCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub ids_add_special_tokens: Vec<u32>,
    pub decoded: String,
    pub decoded_skip_special: String,
}

#[derive(Debug, Deserialize)]
pub struct ChatTemplateCase {
    pub name: String,
    pub messages: Vec<tpuserve_model::ChatMessage>,
    pub add_generation_prompt: bool,
    #[serde(default)]
    pub template_kwargs: serde_json::Map<String, serde_json::Value>,
    pub rendered: String,
    pub ids: Vec<u32>,
}

impl Goldens {
    pub fn load(path: &Path) -> Goldens {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("bad goldens {}: {e}", path.display()))
    }

    /// The batch's cases whose prompt and completion fit `max_model_len` tokens (at least
    /// four of them, or the batch would no longer mix prefill and decode).
    pub fn batch_within(&self, max_model_len: usize) -> Vec<&Case> {
        let cases: Vec<&Case> = self
            .batch
            .case_names
            .iter()
            .map(|n| self.case(n))
            .filter(|c| c.prompt_token_ids.len() + c.completion_token_ids.len() <= max_model_len)
            .collect();
        assert!(cases.len() >= 4, "the batch lost its cases");
        cases
    }

    pub fn case(&self, name: &str) -> &Case {
        self.cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no golden case {name}"))
    }
}

/// `last_logits.safetensors`: case name → full-vocab f32 logits of the last prompt position.
pub fn last_logits(path: &Path) -> HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (name, v)
        })
        .collect()
}
