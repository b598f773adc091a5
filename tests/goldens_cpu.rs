//! The CPU runner against the HF goldens: prompt ids, greedy tokens, logprobs, prompt logprobs
//! and last-position logits, alone, batched, and with chunked prefill.

use tpuserve_model::chat_template::RenderOptions;
use tpuserve_model::{load_model, LoadedModel};
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions};
use tpuserve_suite::driver::{self, SeqRequest, SeqResult};
use tpuserve_suite::goldens::{last_logits, Case, Goldens};
use tpuserve_suite::{fixtures_dir, smollm2_gguf, tiny_llama3_dir};

const TOL: f64 = 1e-3;

fn prompt_ids(model: &LoadedModel, c: &Case) -> Vec<u32> {
    if let Some(msgs) = &c.messages {
        let text = model
            .chat_template
            .as_ref()
            .unwrap()
            .render(
                msgs,
                &RenderOptions {
                    add_generation_prompt: true,
                    ..Default::default()
                },
            )
            .unwrap();
        model.tokenizer.encode(&text, false).unwrap()
    } else {
        let text = c.prompt.as_str().unwrap();
        model
            .tokenizer
            .encode(text, c.add_special_tokens.unwrap_or(true))
            .unwrap()
    }
}

fn request(c: &Case, arrive: usize) -> SeqRequest {
    SeqRequest {
        prompt: c.prompt_token_ids.clone(),
        max_new_tokens: c.completion_token_ids.len(),
        logprobs: 5,
        prompt_logprobs: c.prompt_logprobs.as_ref().map(|_| 5),
        arrive_at_step: arrive,
    }
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: {a} vs golden {b}");
}

fn check_case(c: &Case, r: &SeqResult, check_prompt_logprobs: bool) {
    assert_eq!(
        r.tokens, c.completion_token_ids,
        "{}: greedy tokens",
        c.name
    );
    for (i, (lp, g)) in r.logprobs.iter().zip(&c.steps).enumerate() {
        close(
            lp.logprob as f64,
            g.logprob,
            &format!("{} step {i} logprob", c.name),
        );
        assert_eq!(lp.top.len(), g.top.len());
        for (k, (&(tid, v), &(gid, gv))) in lp.top.iter().zip(&g.top).enumerate() {
            close(v as f64, gv, &format!("{} step {i} top{k}", c.name));
            // Near-ties may swap order within the tolerance.
            if (v as f64 - gv).abs() < TOL && tid != gid {
                let other = lp
                    .top
                    .iter()
                    .find(|x| x.0 == gid)
                    .expect("golden id in top");
                close(other.1 as f64, gv, "swapped near-tie");
            }
        }
    }
    assert_eq!(r.logprobs.len(), c.steps.len());
    if let (true, Some(gp)) = (check_prompt_logprobs, &c.prompt_logprobs) {
        assert_eq!(
            r.prompt_logprobs.len() + 1,
            gp.len(),
            "{}: prompt logprobs count",
            c.name
        );
        for (i, (mine, g)) in r.prompt_logprobs.iter().zip(gp.iter().skip(1)).enumerate() {
            let g = g.as_ref().unwrap();
            assert_eq!(mine.token, g.token_id);
            close(
                mine.logprob as f64,
                g.logprob,
                &format!("{} prompt pos {}", c.name, i + 1),
            );
            // Deep in the tail, logits 1e-5 apart can swap rank between implementations.
            let slack = (g.rank / 1000).max(if g.rank > 20 { 1 } else { 0 });
            assert!(
                mine.rank.abs_diff(g.rank) <= slack,
                "{} prompt pos {} rank {} vs {}",
                c.name,
                i + 1,
                mine.rank,
                g.rank
            );
            for (&(_, v), &(_, gv)) in mine.top.iter().zip(&g.top) {
                close(
                    v as f64,
                    gv,
                    &format!("{} prompt pos {} top", c.name, i + 1),
                );
            }
        }
    }
}

fn runner(model: &LoadedModel, blocks: usize) -> CpuRunner {
    CpuRunner::new(
        model,
        CpuRunnerOptions {
            num_blocks: blocks,
            block_size: 16,
        },
    )
    .unwrap()
}

fn run_all_single(model: &LoadedModel, goldens: &str, logits_file: &str) {
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let logits = last_logits(&fixtures_dir().join(logits_file));
    let mut r = runner(model, 256);
    for c in &g.cases {
        assert_eq!(
            prompt_ids(model, c),
            c.prompt_token_ids,
            "{}: prompt ids",
            c.name
        );
        let res = driver::run(&mut r, vec![request(c, 0)], 4096).remove(0);
        check_case(c, &res, true);
        if let Some(gl) = logits.get(&c.name) {
            let mine = res.last_prompt_logits.as_ref().unwrap();
            assert_eq!(mine.len(), gl.len());
            let worst = mine
                .iter()
                .zip(gl)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= TOL as f32,
                "{}: last logits differ by {worst}",
                c.name
            );
        }
    }
    assert!(!logits.is_empty());
}

fn run_batch(model: &LoadedModel, goldens: &str, stagger: bool, chunk: usize) {
    let g = Goldens::load(&fixtures_dir().join(goldens));
    let cases: Vec<&Case> = g.batch.case_names.iter().map(|n| g.case(n)).collect();
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| request(c, if stagger { i * 3 } else { 0 }))
        .collect();
    let mut r = runner(model, 512);
    let res = driver::run(&mut r, reqs, chunk);
    for (c, r) in cases.iter().zip(&res) {
        check_case(c, r, true);
    }
}

#[test]
fn smollm2_gguf_single_requests_match_goldens() {
    let model = load_model(&smollm2_gguf()).unwrap();
    run_all_single(
        &model,
        "smollm2/goldens.json",
        "smollm2/last_logits.safetensors",
    );
}

#[test]
fn smollm2_batch_matches_goldens() {
    let model = load_model(&smollm2_gguf()).unwrap();
    run_batch(&model, "smollm2/goldens.json", false, 4096);
    run_batch(&model, "smollm2/goldens.json", true, 64);
}

#[test]
fn tiny_llama3_single_requests_match_goldens() {
    let model = load_model(&tiny_llama3_dir()).unwrap();
    run_all_single(
        &model,
        "tiny-llama3/goldens.json",
        "tiny-llama3/last_logits.safetensors",
    );
}

#[test]
fn tiny_llama3_batch_and_chunked_prefill_match_goldens() {
    let model = load_model(&tiny_llama3_dir()).unwrap();
    run_batch(&model, "tiny-llama3/goldens.json", false, 4096);
    run_batch(&model, "tiny-llama3/goldens.json", true, 256);
    let g = Goldens::load(&fixtures_dir().join("tiny-llama3/goldens.json"));
    let c = g.case("long_context_2k");
    let mut r = runner(&model, 256);
    let res = driver::run(&mut r, vec![request(c, 0)], 256).remove(0);
    check_case(c, &res, true);
}
