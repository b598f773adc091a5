//! Which attention the step programs run (`--attention-backend`): the StableHLO attention,
//! or the Pallas kernel of `kernels/` where an artifact exists for a bucket's shape and the
//! kernel passed its start-up self-check on this device. Nothing here may fail a start: a
//! missing artifact, a kernel that does not compile or a self-check mismatch logs a warning
//! and the programs keep the StableHLO attention.

use super::*;
use crate::hlo::Elem;
use crate::pallas::{check_program, AttentionKernels, AttentionShape, KernelCall};
use std::path::{Path, PathBuf};

/// `--attention-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// The Pallas kernel for prompt tiles wherever artifacts lowered for this device exist
    /// (`--attention-kernels DIR`, else the image's [`IMAGE_KERNELS`]) and pass the self-check;
    /// the StableHLO attention for decode and everywhere else. tpuserve's cost model prices
    /// the kernel cheaper for prompts (70B TP 8, a 2,048-token prompt's attention 19.0 →
    /// 4.1 ms with 64-token pages) but slower for decode (128 × 2,048: 24.0 vs 20.8 ms), where
    /// each page costs two small copies (kernels/README.md).
    #[default]
    Auto,
    Xla,
    /// The kernel for every bucket it has an artifact for.
    Pallas,
}

/// Where the TPU image keeps the kernel artifacts it ships, a folder per configuration
/// (`docker/build-attention-kernels.sh`); `auto` looks here when no `--attention-kernels`
/// is given.
pub const IMAGE_KERNELS: &str = "/opt/tpuserve/kernels";

/// The folder under `root` (itself or one of its sub-folders) holding the most artifacts of
/// `shapes` lowered for `target`, if any holds one.
pub fn find_kernel_dir(root: &Path, shapes: &[AttentionShape], target: &str) -> Option<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(root) {
        let mut subs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        dirs.extend(subs);
    }
    let usable = |d: &Path| {
        let (loaded, _) = AttentionKernels::load(d, shapes);
        shapes
            .iter()
            .filter(|s| loaded.get(s).is_some_and(|c| c.target == target))
            .count()
    };
    dirs.into_iter()
        .map(|d| (usable(&d), d))
        .filter(|(n, _)| *n > 0)
        .max_by_key(|(n, _)| *n)
        .map(|(_, d)| d)
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

    /// The device artifacts must have been lowered for: `cpu` on the CPU plugin, else the
    /// device kind (`TPU v6 lite`).
    fn kernel_target(&self) -> String {
        if self.client.platform_name().unwrap_or_default() == "cpu" {
            "cpu".to_string()
        } else {
            self.devices[0].kind().unwrap_or_default()
        }
    }

    /// Loads and checks the kernel where `--attention-backend` asks for it; sets
    /// `cfg.attention_kernels` when it may run.
    pub(crate) fn choose_attention(&mut self) {
        let backend = self.opts.attention_backend;
        let stablehlo = |r: &mut XlaRunner, line: String| {
            r.attention_line = line;
            tracing::info!("{}", r.attention_line);
        };
        if backend == AttentionBackend::Xla {
            return stablehlo(
                self,
                "attention: StableHLO (--attention-backend xla)".into(),
            );
        }
        let auto = backend == AttentionBackend::Auto;
        let fallback = |r: &mut XlaRunner, why: String| {
            r.attention_line = format!("attention: StableHLO, not the Pallas kernel: {why}");
            tracing::warn!("{}", r.attention_line);
        };
        let target = self.kernel_target();
        let wanted = match self.attention_shapes() {
            // `auto` asks the kernel for prompt tiles only (see `AttentionBackend::Auto`).
            Ok(w) if auto => w.into_iter().filter(|s| s.rows > 1).collect(),
            Ok(w) => w,
            Err(e) if auto => {
                return stablehlo(
                    self,
                    format!("attention: StableHLO (--attention-backend auto: {e})"),
                )
            }
            Err(e) => return fallback(self, e),
        };
        let dir = match self.opts.attention_kernels.clone() {
            Some(d) => d,
            None if auto => match find_kernel_dir(Path::new(IMAGE_KERNELS), &wanted, &target) {
                Some(d) => d,
                None => {
                    return stablehlo(
                        self,
                        format!(
                            "attention: StableHLO (--attention-backend auto: no Pallas \
                                 kernel artifact for this configuration's prompt tiles, lowered \
                                 for `{target}`, in --attention-kernels or {IMAGE_KERNELS})"
                        ),
                    )
                }
            },
            None => return fallback(self, "no --attention-kernels DIR was given".into()),
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
            "attention: the Pallas kernel ({} of {} {}shapes, artifacts from {}, each checked \
             against the StableHLO attention){}",
            kernels.len(),
            wanted.len(),
            if auto { "prompt-tile " } else { "" },
            dir.display(),
            if auto {
                "; decode keeps the StableHLO attention (--attention-backend auto: tpuserve's \
                 cost model prices the kernel's decode slower)"
            } else {
                ""
            }
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
