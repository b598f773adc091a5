//! Grammars compiled for the real SmolLM2 tokenizer, walked token by token with pseudo-random
//! choices among the allowed tokens: whatever the walk picks must be valid output.

use std::sync::{Arc, OnceLock};

use serde_json::{json, Value};
use tpuserve_model::gguf::GgufFile;
use tpuserve_model::Tokenizer;

use super::*;

struct Fixture {
    tokenizer: Arc<Tokenizer>,
    compiler: GrammarCompiler,
    eos: u32,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path = tpuserve_model::locate::smollm2_gguf()
            .expect("SmolLM2 GGUF not found: run scripts/setup.sh");
        let gguf = GgufFile::open(&path).unwrap();
        let tokenizer = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let eos = tokenizer.token_to_id("<|im_end|>").unwrap();
        // Logit rows past the tokenizer (padding) must stay unreachable.
        let vocab = tokenizer.vocab_size() + 40;
        let env = model_tok_env(tokenizer.clone(), vocab, &[eos, 0]).unwrap();
        Fixture {
            compiler: GrammarCompiler::new(&env).unwrap(),
            tokenizer,
            eos,
        }
    })
}

fn allowed(mask: &[u32]) -> Vec<u32> {
    (0..mask.len() * 32)
        .filter(|&t| mask[t / 32] >> (t % 32) & 1 == 1)
        .map(|t| t as u32)
        .collect()
}

/// Walks the grammar with choices drawn from `seed`; returns the text and how it ended.
fn walk(spec: &ConstraintSpec, seed: u64, max_tokens: usize) -> (String, bool) {
    let f = fixture();
    let (c, _) = f.compiler.compile(spec).unwrap();
    let mut m = c.matcher();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::new();
    for _ in 0..max_tokens {
        let mask = next_mask(&mut m).unwrap();
        let ok = allowed(&mask);
        assert!(!ok.is_empty(), "the grammar allows nothing");
        assert!(
            ok.iter()
                .all(|&t| (t as usize) < f.tokenizer.vocab_size() || t == f.eos),
            "a padding row is allowed"
        );
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state
        };
        // End when allowed half of the time, and mostly avoid whitespace-only tokens (JSON
        // allows them almost everywhere), so walks finish.
        let t = if ok.contains(&f.eos) && next() >> 63 == 1 {
            f.eos
        } else {
            let mut t = ok[(next() >> 33) as usize % ok.len()];
            for _ in 0..16 {
                let text = f.tokenizer.decode(&[t], false).unwrap();
                if !text.trim().is_empty() {
                    break;
                }
                t = ok[(next() >> 33) as usize % ok.len()];
            }
            t
        };
        if t == f.eos {
            return (f.tokenizer.decode(&out, false).unwrap(), true);
        }
        m.consume_token(t).unwrap();
        out.push(t);
        if m.is_stopped() {
            return (f.tokenizer.decode(&out, false).unwrap(), true);
        }
    }
    (f.tokenizer.decode(&out, false).unwrap(), false)
}

#[test]
fn json_schema_walks_give_valid_objects() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    let spec = ConstraintSpec::new(GrammarKind::JsonSchema(schema));
    for seed in 0..8 {
        let (text, done) = walk(&spec, seed, 200);
        assert!(done, "seed {seed}: not finished: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["name"].as_str().unwrap().chars().count() <= 8, "{text}");
        let age = v["age"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{text}");
        let tags = v["tags"].as_array().unwrap();
        assert!(
            tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
            "{text}"
        );
        assert_eq!(v.as_object().unwrap().len(), 3, "{text}");
    }
}

#[test]
fn no_whitespace_and_closed_objects_options() {
    let mut spec = ConstraintSpec::new(GrammarKind::JsonSchema(json!({
        "type": "object",
        "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
        "required": ["a"]
    })));
    spec.disable_any_whitespace = true;
    spec.disable_additional_properties = true;
    for seed in 0..6 {
        let (text, done) = walk(&spec, seed, 120);
        assert!(done, "{text}");
        assert!(!text.contains(char::is_whitespace), "{text:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 1, "{text}");
    }
}

#[test]
fn regex_choice_and_gbnf_walks() {
    let spec = ConstraintSpec::new(GrammarKind::Regex(r"[0-9]{3}-[a-z]{2,4}".into()));
    for seed in 0..6 {
        let (text, done) = walk(&spec, seed, 40);
        assert!(done, "{text}");
        let (d, l) = text.split_once('-').unwrap();
        assert!(
            d.len() == 3 && d.chars().all(|c| c.is_ascii_digit()),
            "{text}"
        );
        assert!(
            (2..=4).contains(&l.len()) && l.chars().all(|c| c.is_ascii_lowercase()),
            "{text}"
        );
    }
    let choices = vec!["red".to_string(), "green \"quoted\"".into(), "blue".into()];
    let spec = ConstraintSpec::new(GrammarKind::Choice(choices.clone()));
    for seed in 0..6 {
        let (text, done) = walk(&spec, seed, 20);
        assert!(done && choices.contains(&text), "{text}");
    }
    let g =
        "root ::= expr\nexpr ::= term ((\"+\" | \"-\") term)*\nterm ::= [0-9] | \"(\" expr \")\"\n";
    let spec = ConstraintSpec::new(GrammarKind::Grammar(g.into()));
    for seed in 0..6 {
        let (text, done) = walk(&spec, seed, 60);
        if !done {
            continue; // deep nesting may outlast the walk; what came out is still a prefix
        }
        assert!(balanced_sum(&text), "{text}");
    }
}

/// expr := term (('+'|'-') term)*, term := digit | '(' expr ')'
fn balanced_sum(s: &str) -> bool {
    fn expr(b: &[u8], i: &mut usize) -> bool {
        if !term(b, i) {
            return false;
        }
        while *i < b.len() && (b[*i] == b'+' || b[*i] == b'-') {
            *i += 1;
            if !term(b, i) {
                return false;
            }
        }
        true
    }
    fn term(b: &[u8], i: &mut usize) -> bool {
        match b.get(*i) {
            Some(c) if c.is_ascii_digit() => {
                *i += 1;
                true
            }
            Some(b'(') => {
                *i += 1;
                let ok = expr(b, i) && b.get(*i) == Some(&b')');
                *i += 1;
                ok
            }
            _ => false,
        }
    }
    let mut i = 0;
    expr(s.as_bytes(), &mut i) && i == s.len()
}

#[test]
fn bad_specs_are_invalid_and_good_ones_cached() {
    let c = &fixture().compiler;
    let bad = [
        GrammarKind::Regex("(unclosed".into()),
        GrammarKind::Regex("[z-a]".into()),
        GrammarKind::JsonSchema(json!({"type": "nonsense"})),
        GrammarKind::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
        GrammarKind::JsonSchema(json!({"$ref": "#/$defs/missing"})),
        GrammarKind::JsonSchema(json!(42)),
        GrammarKind::Choice(vec![]),
        GrammarKind::Grammar("start: undefined_rule".into()),
        GrammarKind::Grammar("root ::= \"a".into()),
        GrammarKind::Grammar("   ".into()),
    ];
    for k in bad {
        let r = c.compile(&ConstraintSpec::new(k.clone()));
        assert!(
            matches!(r, Err(ConstraintError::Invalid(_))),
            "{k:?} compiled"
        );
    }
    let spec = ConstraintSpec::new(GrammarKind::Regex("yes|no".into()));
    assert!(!c.compile(&spec).unwrap().1);
    assert!(c.compile(&spec).unwrap().1);
}

#[test]
fn json_whitespace_runs_are_bounded() {
    let f = fixture();
    let spec = ConstraintSpec::new(GrammarKind::JsonSchema(json!({"type": "object"})));
    let (c, _) = f.compiler.compile(&spec).unwrap();
    let mut m = c.matcher();
    let brace = f.tokenizer.token_to_id("{").unwrap();
    let space = f.tokenizer.token_to_id("Ġ").unwrap();
    let allows = |m: &mut llguidance::Matcher, t: u32| {
        let mask = next_mask(m).unwrap();
        mask[t as usize / 32] >> (t % 32) & 1 == 1
    };
    m.consume_token(brace).unwrap();
    for i in 0..20 {
        assert!(allows(&mut m, space), "space {i} refused");
        m.consume_token(space).unwrap();
    }
    assert!(!allows(&mut m, space), "a 21st space was allowed");
}
