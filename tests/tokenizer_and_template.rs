//! Tokenizers (GGUF-built and tokenizer.json) and chat templates against the HF goldens.

use tpuserve_model::chat_template::RenderOptions;
use tpuserve_model::{gguf::GgufFile, load_model, Tokenizer};
use tpuserve_suite::goldens::Goldens;
use tpuserve_suite::{fixtures_dir, smollm2_gguf, tiny_llama3_dir};

fn check_tokenization(tok: &Tokenizer, g: &Goldens, label: &str) {
    assert!(!g.tokenization.is_empty());
    for c in &g.tokenization {
        assert_eq!(
            tok.encode(&c.text, false).unwrap(),
            c.ids,
            "{label}: {:?}",
            c.text
        );
        assert_eq!(
            tok.encode(&c.text, true).unwrap(),
            c.ids_add_special_tokens,
            "{label} (special): {:?}",
            c.text
        );
        assert_eq!(
            tok.decode(&c.ids, false).unwrap(),
            c.decoded,
            "{label} decode"
        );
        assert_eq!(
            tok.decode(&c.ids, true).unwrap(),
            c.decoded_skip_special,
            "{label} decode skip"
        );
    }
}

#[test]
fn smollm2_gguf_tokenizer_matches_goldens_and_tokenizer_json() {
    let g = Goldens::load(&fixtures_dir().join("smollm2/goldens.json"));
    let gguf = GgufFile::open(&smollm2_gguf()).unwrap();
    let from_gguf = Tokenizer::from_gguf(&gguf).unwrap();
    let from_json =
        Tokenizer::from_file(&fixtures_dir().join("smollm2/tokenizer/tokenizer.json")).unwrap();
    check_tokenization(&from_gguf, &g, "gguf");
    check_tokenization(&from_json, &g, "tokenizer.json");
    assert_eq!(from_gguf.vocab_size(), from_json.vocab_size());
    for c in &g.cases {
        if let Some(text) = c.prompt.as_str() {
            assert_eq!(
                from_gguf.encode(text, true).unwrap(),
                from_json.encode(text, true).unwrap(),
                "{}",
                c.name
            );
        }
    }
}

#[test]
fn tiny_llama3_tokenizer_matches_goldens() {
    let g = Goldens::load(&fixtures_dir().join("tiny-llama3/goldens.json"));
    let tok = Tokenizer::from_file(&tiny_llama3_dir().join("tokenizer.json")).unwrap();
    check_tokenization(&tok, &g, "llama3");
}

fn check_templates(model_path: &std::path::Path, goldens: &str) {
    let model = load_model(model_path).unwrap();
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let tmpl = model
        .chat_template
        .as_ref()
        .expect("model has a chat template");
    assert!(!g.chat_template.is_empty());
    for c in &g.chat_template {
        let opts = RenderOptions {
            add_generation_prompt: c.add_generation_prompt,
            extra: c.template_kwargs.clone(),
            now: chrono_date(2024, 7, 26),
            ..Default::default()
        };
        let out = tmpl.render(&c.messages, &opts).unwrap();
        assert_eq!(out, c.rendered, "{goldens}: {}", c.name);
        assert_eq!(
            model.tokenizer.encode(&out, false).unwrap(),
            c.ids,
            "{}",
            c.name
        );
    }
}

fn chrono_date(y: i32, m: u32, d: u32) -> Option<chrono::NaiveDateTime> {
    chrono::NaiveDate::from_ymd_opt(y, m, d).and_then(|d| d.and_hms_opt(12, 0, 0))
}

#[test]
fn smollm2_gguf_chat_template_renders_goldens() {
    check_templates(&smollm2_gguf(), "smollm2/goldens.json");
}

#[test]
fn tiny_llama3_chat_template_renders_goldens() {
    check_templates(&tiny_llama3_dir(), "tiny-llama3/goldens.json");
}
