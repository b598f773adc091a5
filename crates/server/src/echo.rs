//! `echo` with `logprobs` on `/v1/completions`, as vLLM: the logprobs cover the prompt tokens
//! too (the first has none: nothing precedes it), then the generated ones, with text offsets
//! running over the echoed prompt and the completion. The prompt's logprobs come from the
//! engine's prompt-logprobs pass, asked for with the same number of alternatives.

use tpuserve_engine::TokenLogprobs;

use crate::app::completion_logprobs;
use crate::protocol::CompletionLogprobs;
use crate::state::SharedState;

/// Logprobs of `prompt_ids` (from `prompt_lps`, index-aligned, `None` where there are none)
/// followed by `output`, offsets from `offset0`; alternatives limited to `k`.
pub fn prompt_then_output(
    st: &SharedState,
    prompt_ids: &[u32],
    prompt_lps: &[Option<TokenLogprobs>],
    output: &[TokenLogprobs],
    k: usize,
    offset0: usize,
    as_ids: bool,
) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = offset0;
    for (i, &id) in prompt_ids.iter().enumerate() {
        match prompt_lps.get(i).and_then(Option::as_ref) {
            Some(lp) => {
                let mut lp = lp.clone();
                lp.top.truncate(k);
                append(&mut out, completion_logprobs(st, &[lp], offset, as_ids));
            }
            None => {
                let tok = crate::app::shown_token(st, id, as_ids);
                out.text_offset.push(offset);
                out.token_logprobs.push(None);
                out.top_logprobs.push(None);
                out.tokens.push(tok);
            }
        }
        offset = out.text_offset.last().copied().unwrap_or(offset)
            + out.tokens.last().map_or(0, String::len);
    }
    append(&mut out, completion_logprobs(st, output, offset, as_ids));
    out
}

fn append(to: &mut CompletionLogprobs, from: CompletionLogprobs) {
    to.text_offset.extend(from.text_offset);
    to.token_logprobs.extend(from.token_logprobs);
    to.tokens.extend(from.tokens);
    to.top_logprobs.extend(from.top_logprobs);
}
