//! One step on the devices: a plan split into bucket-sized chunks, each chunk's inputs
//! uploaded, the program run with the KV cache donated, and only the sampled tokens and the
//! requested logprobs read back.

use super::*;

impl XlaRunner {
    fn rng_key(&mut self, p: &SamplingParams, step: u64) -> u32 {
        let u = match p.seed {
            Some(seed) => seeded_uniform(seed, step),
            None => {
                self.unseeded_counter += 1;
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                seeded_uniform(nanos ^ self.unseeded_counter, step)
            }
        };
        (u * 4_294_967_296.0) as u32
    }

    /// Splits a step into executions: decoding rows (one query row per sequence) as tiles
    /// of one, prompt rows as tiles of `attention_tile` rows of one sequence each, in order
    /// (a long prompt's later rows may land in a later execution, after its earlier rows'
    /// KV is written).
    fn executions(&self, plan: &StepPlan) -> Result<Vec<Execution>, RunnerError> {
        let cap = self.cfg.table_blocks as usize * self.opts.block_size;
        if let Some(&p) = plan.positions.iter().find(|&&p| p as usize >= cap) {
            return Err(RunnerError::InvalidPlan(format!(
                "position {p} exceeds the compiled context ({cap} tokens)"
            )));
        }
        let mut out = Vec::new();
        let rp = self.opts.attention_tile.max(1);
        for tile in [1, rp] {
            let max = self.max_rows(tile);
            let mut cur = Execution::new(tile);
            for (i, s) in plan.seqs.iter().enumerate() {
                let decode = s.query_len == 1;
                if s.query_len == 0 || decode != (tile == 1) {
                    continue;
                }
                for first in (0..s.query_len).step_by(tile) {
                    if cur.rows.len() + tile > max {
                        out.push(std::mem::replace(&mut cur, Execution::new(tile)));
                    }
                    for k in first..first + tile {
                        cur.rows
                            .push((k < s.query_len).then_some(s.query_start + k));
                    }
                    cur.tile_seq.push(Some(i));
                }
            }
            if !cur.rows.is_empty() {
                out.push(cur);
            }
        }
        Ok(out)
    }

    fn run_chunk(
        &mut self,
        plan: &StepPlan,
        ex: &Execution,
        row_seq: &[usize],
        want_top: bool,
        masks: Option<&[Option<TokenBitmask>]>,
    ) -> Result<ChunkResult, RunnerError> {
        let bs = self.opts.block_size;
        let bucket = self
            .pick_bucket(ex.rows.len(), ex.tile, want_top)
            .ok_or_else(|| {
                RunnerError::InvalidPlan(format!(
                    "no bucket for {} rows in tiles of {}",
                    ex.rows.len(),
                    ex.tile
                ))
            })?;
        self.ensure_compiled(bucket)?;
        let t = bucket.tokens as usize;
        let nt = t / ex.tile;
        let tb = self.cfg.table_blocks as usize;
        let chunk = self.cfg.chunk_blocks(bucket) as usize;
        let scratch = self.scratch_block;
        let mut tokens = vec![0i32; t];
        let mut positions = vec![0i32; t];
        let mut slots = vec![(scratch as usize * bs) as i32; t];
        let mut blocks = vec![scratch as i32; nt * tb];
        let mut targets = vec![-1i32; t];
        let mut temperature = vec![0f32; t];
        let mut keys = vec![0u32; t];
        let mut top_k = vec![0i32; t];
        let mut top_p = vec![1f32; t];
        let mut min_p = vec![0f32; t];
        let mut logit_rows = vec![0i32; t];
        let mut logit_index = HashMap::new();
        let words = mask_words(self.cfg.dims.vocab) as usize;
        // Rows without a constraint allow every token (all bits set).
        let mut mask_host: Option<Vec<i32>> = None;
        for (n, seq) in ex.tile_seq.iter().enumerate() {
            if let Some(i) = *seq {
                for (k, &blk) in plan.seqs[i].block_table.iter().take(tb).enumerate() {
                    blocks[n * tb + k] = blk as i32;
                }
            }
        }
        let mut kv_chunks = 1;
        for (j, &r) in ex.rows.iter().enumerate() {
            let Some(r) = r else { continue };
            let s = &plan.seqs[row_seq[r]];
            tokens[j] = plan.token_ids[r] as i32;
            positions[j] = plan.positions[r] as i32;
            slots[j] = plan.slot_mapping[r] as i32;
            kv_chunks = kv_chunks.max((plan.positions[r] as usize + 1).div_ceil(bs * chunk));
            let local = r - s.query_start;
            if let Some(&tg) = s.prompt_logprob_targets.get(local) {
                targets[j] = tg as i32;
            }
            let samples_here = s.sample && local + 1 == s.query_len;
            if samples_here && !s.sampling.is_greedy() {
                temperature[j] = s.sampling.temperature;
                keys[j] = self.rng_key(&s.sampling, s.output_tokens.len() as u64);
                top_k[j] = s.sampling.top_k.max(0);
                top_p[j] = s.sampling.top_p;
                min_p[j] = s.sampling.min_p;
            }
            if samples_here || local < s.prompt_logprob_targets.len() {
                let k = logit_index.len();
                logit_rows[k] = j as i32;
                logit_index.insert(r, k);
                let mask = masks.and_then(|m| m.get(row_seq[r])?.as_deref());
                if let (true, Some(mask)) = (samples_here, mask) {
                    let host = mask_host.get_or_insert_with(|| vec![-1i32; t * words]);
                    for (dst, &w) in host[k * words..(k + 1) * words].iter_mut().zip(mask) {
                        *dst = w as i32;
                    }
                }
            }
        }
        check_tile_pages(&slots, ex.tile, bs, scratch as usize)?;
        let num_logit_rows = logit_index.len() as i32;
        let upload_i32 =
            |v: &[i32], dims: &[i64], c: &Client, d: &Device| Buffer::from_slice(c, v, dims, d);
        let mut step_inputs: Vec<Vec<Buffer>> = Vec::new();
        for d in &self.devices {
            let c = &self.client;
            step_inputs.push(vec![
                upload_i32(&tokens, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&positions, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&slots, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&blocks, &[nt as i64, tb as i64], c, d).map_err(derr)?,
                upload_i32(&targets, &[t as i64], c, d).map_err(derr)?,
                Buffer::from_slice(c, &temperature, &[t as i64], d).map_err(derr)?,
                Buffer::from_slice(c, &keys, &[t as i64], d).map_err(derr)?,
                upload_i32(&logit_rows, &[t as i64], c, d).map_err(derr)?,
                upload_i32(&[num_logit_rows], &[], c, d).map_err(derr)?,
                upload_i32(&top_k, &[t as i64], c, d).map_err(derr)?,
                Buffer::from_slice(c, &top_p, &[t as i64], d).map_err(derr)?,
                Buffer::from_slice(c, &min_p, &[t as i64], d).map_err(derr)?,
                upload_i32(&[kv_chunks as i32], &[], c, d).map_err(derr)?,
            ]);
        }
        let mask_on = mask_host.is_some() as i32;
        let mut mask_inputs: Vec<Buffer> = Vec::new();
        for (d, dev) in self.devices.iter().enumerate() {
            let c = &self.client;
            if let Some(host) = &mask_host {
                mask_inputs
                    .push(upload_i32(host, &[t as i64, words as i64], c, dev).map_err(derr)?);
                self.stats.bytes_to_device += (host.len() * 4) as u64;
            }
            step_inputs[d].push(upload_i32(&[mask_on], &[], c, dev).map_err(derr)?);
        }
        if mask_host.is_none() && !self.idle_masks.contains_key(&t) {
            let zeros = vec![0i32; t * words];
            let bufs = self
                .devices
                .iter()
                .map(|dev| upload_i32(&zeros, &[t as i64, words as i64], &self.client, dev))
                .collect::<Result<Vec<_>, _>>()
                .map_err(derr)?;
            self.idle_masks.insert(t, bufs);
        }
        let idle = &self.idle_masks;
        let args: Vec<Vec<&Buffer>> = (0..self.devices.len())
            .map(|d| {
                let (weights, scales) = self.weights.split_at(arg::NUM_WEIGHTS);
                let mut a: Vec<&Buffer> = weights.iter().map(|w| &w[d]).collect();
                a.push(&self.k_cache[d]);
                a.push(&self.v_cache[d]);
                let (switch, rest) = step_inputs[d].split_last().expect("step inputs");
                a.extend(rest.iter());
                a.push(match mask_inputs.get(d) {
                    Some(m) => m,
                    None => &idle[&t][d],
                });
                a.push(switch);
                // int8: the scales, after everything else (see `arg`).
                a.extend(scales.iter().map(|s| &s[d]));
                debug_assert_eq!(a.len(), self.cfg.arg_count());
                a
            })
            .collect();
        let exe = self
            .executables
            .get(&bucket)
            .ok_or_else(|| RunnerError::Recompilation(format!("{bucket:?}")))?;
        let mut outputs = exe.execute(&args).map_err(derr)?;
        self.stats.executions += 1;
        // The caches were donated: the outputs are the same memory, updated in place.
        let mut new_k = Vec::with_capacity(outputs.len());
        let mut new_v = Vec::with_capacity(outputs.len());
        let mut first: Vec<Buffer> = Vec::new();
        for (d, outs) in outputs.iter_mut().enumerate() {
            let mut it = std::mem::take(outs).into_iter();
            new_k.push(it.next().ok_or_else(|| derr("missing K cache output"))?);
            new_v.push(it.next().ok_or_else(|| derr("missing V cache output"))?);
            if d == 0 {
                first = it.collect();
            }
        }
        self.k_cache = new_k;
        self.v_cache = new_v;
        let mut fetch_i32 = |i: usize| -> Result<Vec<i32>, RunnerError> {
            let b = first
                .get(i - out::SAMPLED)
                .ok_or_else(|| derr("missing output"))?;
            let v = b.to_vec::<i32>().map_err(derr)?;
            self.stats.bytes_to_host += (v.len() * 4) as u64;
            Ok(v)
        };
        let sampled = fetch_i32(out::SAMPLED)?;
        let sampled_rank = fetch_i32(out::SAMPLED_RANK)?;
        let target_rank = fetch_i32(out::TARGET_RANK)?;
        let top_ids = if bucket.top_k > 0 {
            fetch_i32(out::TOP_IDS)?
        } else {
            Vec::new()
        };
        let mut fetch_f32 = |i: usize| -> Result<Vec<f32>, RunnerError> {
            let b = first
                .get(i - out::SAMPLED)
                .ok_or_else(|| derr("missing output"))?;
            let v = b.to_vec::<f32>().map_err(derr)?;
            self.stats.bytes_to_host += (v.len() * 4) as u64;
            Ok(v)
        };
        let sampled_lp = fetch_f32(out::SAMPLED_LOGPROB)?;
        let target_lp = fetch_f32(out::TARGET_LOGPROB)?;
        let top_lp = if bucket.top_k > 0 {
            fetch_f32(out::TOP_LOGPROBS)?
        } else {
            Vec::new()
        };
        Ok(ChunkResult {
            logit_index,
            k: bucket.top_k as usize,
            sampled,
            sampled_lp,
            sampled_rank,
            target_lp,
            target_rank,
            top_ids,
            top_lp,
        })
    }
}

/// What the step program's KV write assumes of a tile no longer than a page
/// (`program::page_candidates`): its real rows write only the pages of its first and its last
/// real row. A plan where they do not would lose K / V rows silently, so it is refused.
fn check_tile_pages(
    slots: &[i32],
    tile: usize,
    bs: usize,
    scratch: usize,
) -> Result<(), RunnerError> {
    if tile <= 1 || tile > bs {
        return Ok(());
    }
    for rows in slots.chunks(tile) {
        let mut real = rows
            .iter()
            .map(|&s| s as usize / bs)
            .filter(|&b| b != scratch);
        let Some(first) = real.next() else { continue };
        let last = real.clone().next_back().unwrap_or(first);
        if let Some(b) = real.find(|&b| b != first && b != last) {
            return Err(RunnerError::InvalidPlan(format!(
                "a tile of {tile} rows writes KV block {b} besides its first and last rows' \
                 blocks {first} and {last}: its rows are not consecutive positions"
            )));
        }
    }
    Ok(())
}

/// The rows of one execution, tile by tile.
struct Execution {
    tile: usize,
    /// The plan row in each slot (`None`: padding), `tile` slots per tile.
    rows: Vec<Option<usize>>,
    /// The sequence whose pages each tile reads (`None`: a padding tile).
    tile_seq: Vec<Option<usize>>,
}

impl Execution {
    fn new(tile: usize) -> Self {
        Execution {
            tile,
            rows: Vec::new(),
            tile_seq: Vec::new(),
        }
    }
}

struct ChunkResult {
    /// Global row → index in the per-row outputs.
    logit_index: HashMap<usize, usize>,
    k: usize,
    sampled: Vec<i32>,
    sampled_lp: Vec<f32>,
    sampled_rank: Vec<i32>,
    target_lp: Vec<f32>,
    target_rank: Vec<i32>,
    top_ids: Vec<i32>,
    top_lp: Vec<f32>,
}

impl ChunkResult {
    fn top(&self, j: usize, n: usize) -> Vec<(u32, f32)> {
        (0..n.min(self.k))
            .map(|i| {
                (
                    self.top_ids[j * self.k + i] as u32,
                    self.top_lp[j * self.k + i],
                )
            })
            .collect()
    }
}

impl ModelRunner for XlaRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        validate_plan(plan, self.kv_cache_shape())?;
        let vocab = self.cfg.dims.vocab as usize;
        if let Some(bad) = plan.token_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(RunnerError::InvalidPlan(format!(
                "token id {bad} outside the vocabulary ({vocab})"
            )));
        }
        for s in &plan.seqs {
            if s.sample {
                if let Some(what) = unsupported_sampling(&s.sampling) {
                    return Err(RunnerError::InvalidPlan(format!(
                        "{what} is not supported by the XLA runner yet"
                    )));
                }
            }
        }
        let mut row_seq = vec![0usize; plan.num_tokens()];
        for (i, s) in plan.seqs.iter().enumerate() {
            row_seq[s.query_start..s.query_start + s.query_len].fill(i);
        }
        let want_top = plan.seqs.iter().any(|s| {
            (s.sample && s.sampling.logprobs.unwrap_or(0) > 0)
                || (!s.prompt_logprob_targets.is_empty()
                    && s.sampling.prompt_logprobs.unwrap_or(0) > 0)
        });
        let execs = self.executions(plan)?;
        // Structured outputs: the masks the engine computed while this step was prepared.
        let masks = plan.masks.as_ref().map(|m| m.wait());
        let mut row_at: HashMap<usize, (usize, usize)> = HashMap::new();
        let mut results = Vec::with_capacity(execs.len());
        for (ci, ex) in execs.iter().enumerate() {
            let res = self.run_chunk(
                plan,
                ex,
                &row_seq,
                want_top,
                masks.as_deref().map(|m| &m[..]),
            )?;
            for (&r, &j) in &res.logit_index {
                row_at.insert(r, (ci, j));
            }
            results.push(res);
        }
        let seqs = plan
            .seqs
            .iter()
            .map(|s| {
                let mut o = SeqOutput::default();
                let n_prompt = s.sampling.prompt_logprobs.unwrap_or(0);
                for (j, &target) in s.prompt_logprob_targets.iter().enumerate() {
                    let (ci, row) = row_at[&(s.query_start + j)];
                    let c = &results[ci];
                    o.prompt_logprobs.push(TokenLogprobs {
                        token: target,
                        logprob: c.target_lp[row],
                        rank: c.target_rank[row].max(1) as usize,
                        top: c.top(row, n_prompt),
                    });
                }
                if s.sample {
                    let (ci, row) = row_at[&(s.query_start + s.query_len - 1)];
                    let c = &results[ci];
                    let token = c.sampled[row] as u32;
                    let logprobs = s.sampling.logprobs.map(|n| TokenLogprobs {
                        token,
                        logprob: c.sampled_lp[row],
                        rank: c.sampled_rank[row].max(1) as usize,
                        top: c.top(row, n),
                    });
                    o.sampled = Some(SampledToken { token, logprobs });
                }
                o
            })
            .collect();
        Ok(StepOutput { seqs })
    }

    fn sampling_support(&self) -> SamplingSupport {
        SamplingSupport::OnDevice
    }

    fn compile_counters(&self) -> Option<Arc<CompileCounters>> {
        Some(self.counters.clone())
    }

    fn kv_cache_shape(&self) -> KvCacheShape {
        KvCacheShape {
            num_blocks: self.opts.num_blocks,
            block_size: self.opts.block_size,
            // Device buffers are allocated whole at start.
            committed_on_write: false,
        }
    }

    fn vocab_size(&self) -> usize {
        self.cfg.dims.vocab as usize
    }

    fn describe(&self) -> String {
        let attention = if self.attention_kernels_in_use() > 0 {
            ", Pallas attention"
        } else {
            ""
        };
        format!(
            "xla ({:?}, {} device(s), {:?}{attention})",
            self.opts.device,
            self.devices.len(),
            self.opts.weight_dtype
        )
    }
}

#[cfg(test)]
mod tests {
    use super::check_tile_pages;

    /// Pages of 4 slots, tiles of 4 rows, scratch block 9 (slots 36..40).
    #[test]
    fn a_tile_writes_only_its_first_and_last_rows_pages() {
        // Consecutive positions across a page boundary, padding last.
        assert!(check_tile_pages(&[6, 7, 8, 9, 10, 11, 36, 36], 4, 4, 9).is_ok());
        // A padding tile, and decode tiles of one.
        assert!(check_tile_pages(&[36, 36, 36, 36], 4, 4, 9).is_ok());
        assert!(check_tile_pages(&[0, 20, 8, 13], 1, 4, 9).is_ok());
        // A tile longer than a page is written row by row: not checked.
        assert!(check_tile_pages(&[0, 4, 8, 12, 16, 20, 24, 28], 8, 4, 9).is_ok());
        // A middle row on a third page.
        let e = check_tile_pages(&[0, 8, 4, 36], 4, 4, 9).unwrap_err();
        assert!(e.to_string().contains("KV block 2"), "{e}");
    }
}
