//! The compilation manager: the bucket set, warm-up (every bucket compiled on several
//! threads or loaded from the persistent cache before serving), the recompilation guard and
//! its counters.

use super::*;

fn pow2_at_least(n: usize, min: usize) -> usize {
    n.max(min).next_power_of_two()
}

impl XlaRunner {
    /// Token buckets 16, 32, … up to `max_num_batched_tokens`, each for decode rows (tiles
    /// of one row; up to `max_num_seqs`, one row per running sequence) and for prompt rows
    /// (tiles of `attention_tile` rows), with and without top-k logprobs. Context is not a
    /// bucket dimension: the attention loop runs as many chunks as the step's longest
    /// context needs. (Decode buckets past `max_num_seqs` were compiled and never run: at
    /// `--max-num-batched-tokens 2048 --max-num-seqs 128`, 2,048-row decode programs whose
    /// Pallas kernel does not even fit the TPU's scalar memory.)
    pub fn bucket_set(opts: &XlaRunnerOptions) -> Vec<Bucket> {
        let max_t = pow2_at_least(opts.max_num_batched_tokens, 16);
        let tile = opts.attention_tile.max(1);
        let mut out = Vec::new();
        for r in [1, tile] {
            let top = if r == 1 {
                max_t.min(pow2_at_least(opts.max_num_seqs, 16))
            } else {
                max_t.max(r)
            };
            let mut t = pow2_at_least(r, 16);
            while t <= top {
                for k in [0, opts.max_logprobs] {
                    let bucket = Bucket {
                        tokens: t as i64,
                        tile: r as i64,
                        top_k: k as i64,
                    };
                    if !out.contains(&bucket) {
                        out.push(bucket);
                    }
                }
                t *= 2;
            }
        }
        out
    }

    fn compile_ctx(&self) -> CompileCtx<'_> {
        CompileCtx {
            client: &self.client,
            cache: self.cache.as_ref(),
            environment: &self.environment,
            cfg: &self.cfg,
            options: compile_options(
                self.cfg.tp,
                &self.client.platform_name().unwrap_or_default(),
            ),
        }
    }

    pub(crate) fn warm_up(&mut self) -> Result<(), RunnerError> {
        let t0 = Instant::now();
        let n = self.buckets.len();
        // Compile on several threads: XLA compiles one program mostly on one core, and a
        // TPU host has many.
        let workers = std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(1)
            .clamp(1, 8);
        let todo: Vec<Bucket> = self.buckets.clone();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let done = std::sync::atomic::AtomicUsize::new(0);
        let ctx = self.compile_ctx();
        let results: Vec<Result<(Bucket, Compiled), RunnerError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let Some(&b) = todo.get(i) else { break };
                            let r = ctx.compile(b);
                            let k = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                            if let Ok(c) = &r {
                                tracing::info!(
                                    "compiling {k}/{n}: tokens={} tile={} top_k={} ({}, {:.2}s)",
                                    b.tokens,
                                    b.tile,
                                    b.top_k,
                                    c.how,
                                    c.seconds
                                );
                            }
                            let failed = r.is_err();
                            out.push(r.map(|c| (b, c)));
                            if failed {
                                break;
                            }
                        }
                        out
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join().unwrap_or_else(|_| {
                        vec![Err(RunnerError::Device("compile thread panicked".into()))]
                    })
                })
                .collect()
        });
        for r in results {
            let (b, c) = r?;
            self.record(&c);
            self.executables.insert(b, c.exe);
        }
        self.warmed_up = true;
        tracing::info!(
            "{n} programs ready in {:.1}s ({} compiled, {} from cache)",
            t0.elapsed().as_secs_f64(),
            self.stats.compilations,
            self.stats.cache_hits
        );
        Ok(())
    }

    fn record(&mut self, c: &Compiled) {
        let bump = |a: &std::sync::atomic::AtomicU64, n: u64| {
            a.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        };
        match c.how {
            "cache hit" => {
                self.stats.cache_hits += 1;
                bump(&self.counters.cache_hits, 1);
            }
            _ => {
                self.stats.compilations += 1;
                self.stats.compile_seconds += c.seconds;
                bump(&self.counters.compilations, 1);
                bump(&self.counters.compile_micros, (c.seconds * 1e6) as u64);
                if self.cache.is_some() {
                    self.stats.cache_misses += 1;
                    bump(&self.counters.cache_misses, 1);
                }
            }
        }
    }

    /// Compiles a bucket's program or loads it from the persistent cache. After warm-up this
    /// is a recompilation: counted, and an error in strict mode.
    pub fn ensure_compiled(&mut self, b: Bucket) -> Result<&'static str, RunnerError> {
        if self.executables.contains_key(&b) {
            return Ok("ready");
        }
        if self.warmed_up {
            self.stats.compilations_after_warmup += 1;
            self.counters
                .after_warmup
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!("compiling {b:?} after warm-up: this shape was not precompiled");
            if self.opts.strict_no_recompile {
                return Err(RunnerError::Recompilation(format!("{b:?}")));
            }
        }
        let ctx = self.compile_ctx();
        let c = ctx.compile(b)?;
        let how = c.how;
        self.record(&c);
        self.executables.insert(b, c.exe);
        Ok(how)
    }

    /// The smallest bucket of tile size `tile` holding `tokens` rows.
    pub(crate) fn pick_bucket(&self, tokens: usize, tile: usize, top_k: bool) -> Option<Bucket> {
        self.buckets
            .iter()
            .filter(|b| {
                b.tokens as usize >= tokens
                    && b.tile as usize == tile
                    && (b.top_k > 0) == (top_k && self.opts.max_logprobs > 0)
            })
            .min_by_key(|b| b.tokens)
            .copied()
    }

    /// The most rows one execution of tile size `tile` takes.
    pub(crate) fn max_rows(&self, tile: usize) -> usize {
        self.buckets
            .iter()
            .filter(|b| b.tile as usize == tile)
            .map(|b| b.tokens as usize)
            .max()
            .unwrap_or(0)
    }
}

struct Compiled {
    exe: LoadedExecutable,
    how: &'static str,
    seconds: f64,
}

/// Everything needed to compile one bucket, shareable across compile threads.
struct CompileCtx<'a> {
    client: &'a Client,
    cache: Option<&'a CompileCache>,
    environment: &'a str,
    cfg: &'a ProgramConfig,
    options: CompileOptions,
}

impl CompileCtx<'_> {
    fn compile(&self, b: Bucket) -> Result<Compiled, RunnerError> {
        let t = Instant::now();
        let text = self.cfg.emit(b);
        if let Some(dir) = std::env::var_os("TPUSERVE_DUMP_HLO") {
            let path = PathBuf::from(dir)
                .join(format!("step-t{}-r{}-k{}.mlir", b.tokens, b.tile, b.top_k));
            if let Err(e) = std::fs::write(&path, &text) {
                tracing::warn!("cannot dump {}: {e}", path.display());
            }
        }
        let key = CacheKey::new(self.environment, &text, &self.options.encode());
        if let Some(cache) = self.cache {
            match cache.get(&key) {
                Lookup::Hit(bytes) => match self.client.deserialize_and_load(&bytes) {
                    Ok(exe) => {
                        return Ok(Compiled {
                            exe,
                            how: "cache hit",
                            seconds: t.elapsed().as_secs_f64(),
                        })
                    }
                    Err(e) => tracing::warn!("compile cache entry unusable ({e}); recompiling"),
                },
                Lookup::Invalid(why) => tracing::warn!("compile cache: {why}; recompiling"),
                Lookup::Miss => {}
            }
        }
        let exe = self
            .client
            .compile(&text, &self.options)
            .map_err(|e| RunnerError::Device(format!("compiling {b:?}: {e}")))?;
        if let Some(cache) = self.cache {
            match exe.serialize() {
                Ok(bytes) => {
                    if let Err(e) = cache.put(&key, &bytes) {
                        tracing::warn!("cannot write compile cache entry: {e}");
                    }
                }
                Err(e) => tracing::warn!("plugin cannot serialize executables ({e}); not cached"),
            }
        }
        Ok(Compiled {
            exe,
            how: "compiled",
            seconds: t.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode buckets stop at `--max-num-seqs` (rounded up to a power of two); prompt
    /// buckets go up to the token budget.
    #[test]
    fn decode_buckets_stop_at_the_running_sequences() {
        let set = |seqs: usize| {
            let mut b: Vec<(i64, i64)> = XlaRunner::bucket_set(&XlaRunnerOptions {
                max_num_batched_tokens: 2048,
                max_num_seqs: seqs,
                attention_tile: 16,
                max_logprobs: 0,
                ..Default::default()
            })
            .iter()
            .map(|b| (b.tokens, b.tile))
            .collect();
            b.sort();
            b
        };
        let of = |b: &[(i64, i64)], tile: i64| -> Vec<i64> {
            b.iter().filter(|x| x.1 == tile).map(|x| x.0).collect()
        };
        let b = set(128);
        assert_eq!(of(&b, 1), [16, 32, 64, 128]);
        assert_eq!(of(&b, 16), [16, 32, 64, 128, 256, 512, 1024, 2048]);
        assert_eq!(of(&set(100), 1), [16, 32, 64, 128]);
        assert_eq!(of(&set(5), 1), [16]);
        assert_eq!(of(&set(4096), 1), of(&b, 16));
    }
}
