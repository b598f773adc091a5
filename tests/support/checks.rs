//! Golden comparisons shared by the runner and engine tests.

use tpuserve_model::chat_template::RenderOptions;
use tpuserve_model::LoadedModel;

use crate::driver::{SeqRequest, SeqResult};
use crate::goldens::Case;

pub const TOL: f64 = 1e-3;

pub fn prompt_ids(model: &LoadedModel, c: &Case) -> Vec<u32> {
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

/// `cases` run together on `runner` (one arriving per step, 64-token chunks), each checked
/// against its goldens, prompt logprobs included.
pub fn check_batch(runner: &mut dyn tpuserve_runner_api::ModelRunner, cases: &[&Case]) {
    let reqs = cases
        .iter()
        .enumerate()
        .map(|(i, c)| request(c, i))
        .collect();
    for (c, res) in cases.iter().zip(crate::driver::run(runner, reqs, 64)) {
        check_case(c, &res, true);
    }
}

pub fn request(c: &Case, arrive: usize) -> SeqRequest {
    SeqRequest {
        prompt: c.prompt_token_ids.clone(),
        max_new_tokens: c.completion_token_ids.len(),
        logprobs: 5,
        prompt_logprobs: c.prompt_logprobs.as_ref().map(|_| 5),
        arrive_at_step: arrive,
    }
}

/// How many leading tokens of `got` equal the golden continuation `want`: logprobs compare
/// only while the continuations still agree.
pub fn agreeing_prefix(got: &[u32], want: &[u32]) -> usize {
    got.iter().zip(want).take_while(|(a, b)| a == b).count()
}

pub fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: {a} vs golden {b}");
}

pub fn check_case(c: &Case, r: &SeqResult, check_prompt_logprobs: bool) {
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
