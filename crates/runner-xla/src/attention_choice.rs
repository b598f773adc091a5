//! Which attention the step programs run (`--attention-backend`): the StableHLO attention,
//! or the Pallas kernel of `kernels/` where an artifact exists for a bucket's shape and the
//! kernel passed its start-up self-check on this device. Nothing here may fail a start: a
//! missing artifact, a kernel that does not compile or a self-check mismatch logs a warning
//! and the programs keep the StableHLO attention.

use super::*;
use crate::hlo::Elem;
use crate::pallas::{check_program, AttentionKernels, AttentionShape, KernelCall};

/// `--attention-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// The StableHLO attention until the kernel has run on a TPU: the kernel only on request.
    #[default]
    Auto,
    Xla,
    Pallas,
}

/// The largest |kernel − StableHLO| the self-check accepts, relative to the outputs' size:
/// bf16 operands round the scores' and probabilities' inputs differently in the two (chunks
/// of other lengths, so other running maxima); f32 is the same arithmetic in another order.
fn tolerance(elem: Elem, size: f32) -> f32 {
    let rel = if elem == Elem::F32 { 1e-4 } else { 3e-2 };
    rel * size.max(1.0)
}

impl XlaRunner {
    /// The kernel shapes this runner's buckets need (one artifact each, for
    /// `python -m tpuserve_kernels paged-attention --shapes`), or why it has none.
    pub fn attention_shapes(&self) -> Result<Vec<AttentionShape>, String> {
        crate::pallas::attention_shapes(&self.cfg, &self.buckets)
    }

    /// What the runner chose for its attention and why (the start-up log line).
    pub fn attention(&self) -> &str {
        &self.attention_line
    }

    /// How many kernel shapes run the Pallas kernel (0: every bucket runs the StableHLO
    /// attention).
    pub fn attention_kernels_in_use(&self) -> usize {
        self.cfg.attention_kernels.as_ref().map_or(0, |k| k.len())
    }

    /// Loads and checks the kernel when asked for; sets `cfg.attention_kernels` when it may run.
    pub(crate) fn choose_attention(&mut self) {
        let backend = self.opts.attention_backend;
        if backend != AttentionBackend::Pallas {
            self.attention_line =
                format!(
                "attention: StableHLO (--attention-backend {}; the Pallas kernel runs only with \
                 --attention-backend pallas until it has run on a TPU)",
                if backend == AttentionBackend::Xla { "xla" } else { "auto" }
            );
            tracing::info!("{}", self.attention_line);
            return;
        }
        let fallback = |r: &mut XlaRunner, why: String| {
            r.attention_line = format!("attention: StableHLO, not the Pallas kernel: {why}");
            tracing::warn!("{}", r.attention_line);
        };
        let Some(dir) = self.opts.attention_kernels.clone() else {
            return fallback(self, "no --attention-kernels DIR was given".into());
        };
        let wanted = match self.attention_shapes() {
            Ok(w) => w,
            Err(e) => return fallback(self, e),
        };
        // Each shape is checked in the first (smallest) bucket that has it.
        let shapes: Vec<(Bucket, AttentionShape)> = wanted
            .iter()
            .filter_map(|s| {
                let b = self
                    .buckets
                    .iter()
                    .filter(|&&b| AttentionShape::of(&self.cfg, b).as_ref() == Ok(s))
                    .min_by_key(|b| b.tokens)?;
                Some((*b, s.clone()))
            })
            .collect();
        let (loaded, mut missing) = AttentionKernels::load(&dir, &wanted);
        // An artifact runs only on the device it was lowered for.
        let target = if self.client.platform_name().unwrap_or_default() == "cpu" {
            "cpu".to_string()
        } else {
            self.devices[0].kind().unwrap_or_default()
        };
        if target != "cpu" {
            if let Some(why) = wanted.first().and_then(|s| s.tpu_layout_problem()) {
                return fallback(self, why);
            }
        }
        let mut kernels = AttentionKernels::default();
        for (b, s) in &shapes {
            let Some(call) = loaded.get(s) else { continue };
            if call.target != target {
                missing.push((
                    s.clone(),
                    format!(
                        "{} was lowered for `{}`, this device is `{target}`",
                        s.file_name(),
                        call.target
                    ),
                ));
                continue;
            }
            match self.self_check(*b, call) {
                Ok((err, size)) if err <= tolerance(self.cfg.weight_elem.elem(), size) => {
                    tracing::info!(
                        "attention self-check {}: max |kernel − StableHLO| {err:.2e} over \
                         outputs up to {size:.2e}: ok",
                        s.file_name()
                    );
                    kernels.insert(call.clone());
                }
                Ok((err, size)) => {
                    return fallback(
                        self,
                        format!(
                            "self-check {}: max |kernel − StableHLO| {err:.2e} over outputs up to \
                         {size:.2e}, beyond {:.1e}",
                            s.file_name(),
                            tolerance(self.cfg.weight_elem.elem(), size)
                        ),
                    )
                }
                Err(e) => return fallback(self, format!("self-check {}: {e}", s.file_name())),
            }
        }
        // The shapes still wanted, as `python -m tpuserve_kernels paged-attention --shapes`
        // reads them.
        let list: Vec<&AttentionShape> = missing.iter().map(|(s, _)| s).collect();
        let list = serde_json::to_string(&list).unwrap_or_default();
        if kernels.is_empty() {
            let first = missing.first().map(|(_, w)| w.clone()).unwrap_or_default();
            return fallback(
                self,
                format!(
                    "no usable artifact in {} for the {} kernel shapes (first: {first}); the \
                     shapes, for `python -m tpuserve_kernels paged-attention --shapes`: {list}",
                    dir.display(),
                    wanted.len()
                ),
            );
        }
        if let Some((_, first)) = missing.first() {
            tracing::warn!(
                "attention: {} of {} kernel shapes have no usable artifact (first: {first}); \
                 those buckets keep the StableHLO attention. Their shapes, for \
                 `python -m tpuserve_kernels paged-attention --shapes`: {list}",
                missing.len(),
                wanted.len()
            );
        }
        self.attention_line = format!(
            "attention: the Pallas kernel ({} of {} shapes, artifacts from {}, each checked \
             against the StableHLO attention)",
            kernels.len(),
            wanted.len(),
            dir.display()
        );
        tracing::info!("{}", self.attention_line);
        self.cfg = self.cfg.clone().with_attention_kernels(kernels);
    }

    /// Runs `call`'s self-check program (see [`check_program`]) on the runner's caches:
    /// (max |kernel − StableHLO|, max |StableHLO|).
    fn self_check(&mut self, b: Bucket, call: &KernelCall) -> Result<(f32, f32), RunnerError> {
        let text = check_program(&self.cfg, b, call);
        let platform = self.client.platform_name().unwrap_or_default();
        let exe = self
            .client
            .compile(&text, &compile_options(self.cfg.tp, &platform))
            .map_err(|e| derr(format!("compiling the kernel: {e}")))?;
        let args: Vec<Vec<&Buffer>> = (0..self.devices.len())
            .map(|d| vec![&self.k_cache[d], &self.v_cache[d]])
            .collect();
        let outputs = match exe.execute(&args) {
            Ok(o) => o,
            Err(e) => {
                // The caches were donated to a run that failed: start from new ones.
                self.reset_caches()?;
                return Err(derr(format!("running the kernel: {e}")));
            }
        };
        let (mut k, mut v, mut first) = (Vec::new(), Vec::new(), Vec::new());
        for (d, outs) in outputs.into_iter().enumerate() {
            let mut it = outs.into_iter();
            k.push(it.next().ok_or_else(|| derr("missing K cache output"))?);
            v.push(it.next().ok_or_else(|| derr("missing V cache output"))?);
            if d == 0 {
                first = it.collect();
            }
        }
        (self.k_cache, self.v_cache) = (k, v);
        let scalar = |i: usize| -> Result<f32, RunnerError> {
            let b = first
                .get(i)
                .ok_or_else(|| derr("missing self-check output"))?;
            b.to_vec::<f32>()
                .map_err(derr)?
                .first()
                .copied()
                .ok_or_else(|| derr("empty self-check output"))
        };
        let (err, size) = (scalar(0)?, scalar(1)?);
        if !err.is_finite() || !size.is_finite() {
            return Err(derr(format!("non-finite outputs ({err}, {size})")));
        }
        Ok((err, size))
    }

    pub(crate) fn reset_caches(&mut self) -> Result<(), RunnerError> {
        let m = &self.cfg.dims;
        let zero = || {
            weights::zero_cache(
                &self.client,
                &self.devices,
                (m.layers * self.cfg.num_blocks) as usize,
                self.cfg.block_size as usize,
                m.kv_heads as usize,
                m.head_dim as usize,
                self.cfg.cache_elem,
            )
        };
        (self.k_cache, self.v_cache) = (zero()?, zero()?);
        Ok(())
    }
}
