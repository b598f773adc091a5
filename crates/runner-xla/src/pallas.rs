//! The Pallas paged-attention kernel of `kernels/` spliced into the step programs.
//!
//! `python -m tpuserve_kernels` lowers the kernel for a TPU (on a machine without one) into
//! an artifact: a StableHLO module whose `main(q, k_cache, v_cache, tables, ctx, qpos)` is one
//! `stablehlo.custom_call @tpu_custom_call` carrying the Mosaic kernel in its
//! `backend_config`. The kernel's shapes are baked into that module, so there is one
//! artifact per attention shape a configuration compiles ([`AttentionShape::of`]: per
//! bucket). Here the call is read out of the artifact, checked against the shape the step
//! program needs, and emitted in place of the StableHLO attention; libtpu compiles the
//! Mosaic kernel with the rest of the program. Under SPMD the call runs on each chip's shard
//! (manual sharding): its operands leave GSPMD's view through `SPMDFullToShardShape` and its
//! result comes back through `SPMDShardToFullShape`, so the partitioner never gathers the
//! cache for an op it does not understand.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hlo::{Block, Elem, Ty, V};
use crate::program::{uniform_hash, Attend, Bucket, ProgramConfig};

/// The artifact format this runner reads (`kernels/tpuserve_kernels/lower.py`'s `FORMAT`).
pub const ARTIFACT_FORMAT: u64 = 1;

/// One shape of the kernel, per chip: the keywords of `lower.paged_attention_module`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttentionShape {
    pub tiles: i64,
    pub kv_heads: i64,
    pub rows: i64,
    pub group: i64,
    pub head_dim: i64,
    pub page_size: i64,
    pub pages: i64,
    pub table_pages: i64,
    pub chunk_pages: i64,
    pub dtype: String,
    /// The cache's dtype where it is not `dtype` (`--kv-cache-dtype fp8`: `float8_e4m3fn` or
    /// `float8_e5m2`): the kernel copies fp8 pages and widens them in VMEM. Absent otherwise,
    /// so the shapes (and file names) of caches in the activations' dtype are as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dtype: Option<String>,
}

impl AttentionShape {
    /// The kernel call bucket `b` of `cfg` makes on each chip, or why it cannot make one.
    pub fn of(cfg: &ProgramConfig, b: Bucket) -> Result<AttentionShape, String> {
        let m = &cfg.dims;
        let w = cfg.weight_elem.elem();
        let cache_dtype = match cfg.cache_elem {
            e if e == w => None,
            Elem::F8E4M3FN => Some("float8_e4m3fn".to_string()),
            Elem::F8E5M2 => Some("float8_e5m2".to_string()),
            other => {
                return Err(format!(
                    "no kernel for a {} cache beside {} activations",
                    other.mlir(),
                    w.mlir()
                ))
            }
        };
        let dtype = match w {
            Elem::BF16 => "bfloat16",
            Elem::F32 => "float32",
            other => return Err(format!("no kernel for {} activations", other.mlir())),
        };
        let tile = b.tile.max(1);
        Ok(AttentionShape {
            tiles: b.tokens / tile,
            kv_heads: m.kv_heads / cfg.tp,
            rows: tile,
            group: m.heads / m.kv_heads,
            head_dim: m.head_dim,
            page_size: cfg.block_size,
            pages: m.layers * cfg.num_blocks,
            table_pages: cfg.table_blocks,
            chunk_pages: cfg.kv_chunk,
            dtype: dtype.into(),
            cache_dtype,
        })
    }

    /// Why this shape would cost more on a TPU than it saves, if it would: a page of one KV
    /// head is a `[page_size, head_dim]` tile on the TPU's 128 lanes, so a head_dim that is
    /// not a multiple of 128 pads every page, and the compiler copies the whole cache into
    /// that layout for each call (tiny-llama3, head_dim 8, deviceless v6e: temporaries of
    /// ~24 × the cache). vLLM's TPU backend pads heads to 128 for the same reason.
    pub fn tpu_layout_problem(&self) -> Option<String> {
        (self.head_dim % 128 != 0).then(|| {
            format!(
                "head_dim {} is not a multiple of the TPU's 128 lanes: every page would be \
                 padded, and the whole cache copied into that layout for each call",
                self.head_dim
            )
        })
    }

    /// The artifact's file name (`lower.file_name` in Python writes the same).
    pub fn file_name(&self) -> String {
        format!(
            "paged_attention-t{}-h{}-r{}-g{}-d{}-p{}-n{}-b{}-c{}-{}{}.json",
            self.tiles,
            self.kv_heads,
            self.rows,
            self.group,
            self.head_dim,
            self.page_size,
            self.pages,
            self.table_pages,
            self.chunk_pages,
            self.dtype,
            match &self.cache_dtype {
                Some(c) => format!("-kv{c}"),
                None => String::new(),
            }
        )
    }

    fn elem(&self) -> Elem {
        if self.dtype == "float32" {
            Elem::F32
        } else {
            Elem::BF16
        }
    }

    /// The caches' element type.
    fn cache_elem(&self) -> Elem {
        match self.cache_dtype.as_deref() {
            Some("float8_e4m3fn") => Elem::F8E4M3FN,
            Some("float8_e5m2") => Elem::F8E5M2,
            _ => self.elem(),
        }
    }

    /// `main`'s operand types, in its order: q, k_cache, v_cache, tables, ctx, qpos.
    pub fn operand_types(&self) -> Vec<Ty> {
        let e = self.elem();
        let rg = self.rows * self.group;
        let cache = [self.pages, self.kv_heads, self.page_size, self.head_dim];
        let c = self.cache_elem();
        vec![
            Ty::new(&[self.tiles, self.kv_heads, rg, self.head_dim], e),
            Ty::new(&cache, c),
            Ty::new(&cache, c),
            Ty::new(&[self.tiles, self.table_pages], Elem::I32),
            Ty::new(&[self.tiles], Elem::I32),
            Ty::new(&[self.tiles, rg, 1], Elem::I32),
        ]
    }

    pub fn result_type(&self) -> Ty {
        self.operand_types()[0].clone()
    }
}

/// The distinct kernel shapes of `buckets` (buckets differing only in top-k share one), or
/// why the configuration has none.
pub fn attention_shapes(
    cfg: &ProgramConfig,
    buckets: &[Bucket],
) -> Result<Vec<AttentionShape>, String> {
    let mut shapes = Vec::new();
    for &b in buckets {
        let s = AttentionShape::of(cfg, b)?;
        if !shapes.contains(&s) {
            shapes.push(s);
        }
    }
    Ok(shapes)
}

/// `module` (a program's text) with the functions `call` needs added after its own (a `cpu`
/// artifact's; a TPU artifact needs none).
pub fn with_functions(module: String, call: Option<&KernelCall>) -> String {
    match call.and_then(KernelCall::functions) {
        Some(funcs) => {
            let end = module.rfind('}').unwrap_or(module.len());
            format!("{}{funcs}{}", &module[..end], &module[end..])
        }
        None => module,
    }
}

/// The call of one artifact, ready to be emitted with other operands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KernelCall {
    pub shape: AttentionShape,
    /// The device kind the artifact was lowered for (`TPU v6 lite`, or `cpu`).
    pub target: String,
    body: Body,
    pub module_sha256: String,
}

/// What the step program runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Body {
    /// A TPU artifact: one `tpu_custom_call` (the Mosaic kernel), emitted in place.
    Custom {
        /// For each operand of the call, the `main` argument it is (scalar prefetch
        /// operands come first in the call).
        order: Vec<usize>,
        /// The call's attributes as the artifact prints them (`backend_config`, layouts, …).
        attrs: String,
    },
    /// A `cpu` artifact: the kernel through Pallas' HLO interpreter, plain StableHLO in
    /// several functions; they join the step's module renamed under `prefix` and the step
    /// calls `{prefix}main`.
    Functions { prefix: String, text: String },
}

#[derive(Deserialize)]
struct Artifact {
    format: u64,
    kernel: String,
    target: String,
    shape: AttentionShape,
    module: String,
    module_sha256: String,
}

/// The `tensor<…>` types in `s`, in order.
fn tensor_types(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("tensor<") {
        let Some(j) = rest[i..].find('>') else { break };
        out.push(rest[i..i + j + 1].to_string());
        rest = &rest[i + j + 1..];
    }
    out
}

impl KernelCall {
    /// Reads an artifact (JSON) and checks that its module is one call of its shape.
    pub fn from_artifact(json: &str) -> Result<KernelCall, String> {
        let a: Artifact =
            serde_json::from_str(json).map_err(|e| format!("not a kernel artifact: {e}"))?;
        if a.format != ARTIFACT_FORMAT || a.kernel != "paged_attention" {
            return Err(format!(
                "artifact format {} of kernel `{}`; this runner reads format {ARTIFACT_FORMAT} \
                 of `paged_attention`",
                a.format, a.kernel
            ));
        }
        let m = &a.module;
        let sig = m
            .find("func.func public @main(")
            .map(|i| &m[i..])
            .and_then(|s| s.find(") -> (").map(|j| (&s[..j], &s[j..])))
            .ok_or("the module has no `main`")?;
        let want: Vec<String> = a.shape.operand_types().iter().map(Ty::mlir).collect();
        let got = tensor_types(sig.0);
        if got != want {
            return Err(format!(
                "the module's operands are {got:?}, its shape says {want:?}"
            ));
        }
        let ret = tensor_types(sig.1.lines().next().unwrap_or(""));
        if ret != [a.shape.result_type().mlir()] {
            return Err(format!("the module returns {ret:?}"));
        }
        const CALL: &str = "stablehlo.custom_call @tpu_custom_call(";
        let body = match m.matches(CALL).count() {
            0 if a.target == "cpu" => functions(m, &a.module_sha256)?,
            0 => {
                return Err(format!(
                    "a `{}` artifact without a tpu_custom_call",
                    a.target
                ))
            }
            1 => custom_call(m, CALL)?,
            _ => return Err("the module holds more than one tpu_custom_call".into()),
        };
        Ok(KernelCall {
            shape: a.shape,
            target: a.target,
            body,
            module_sha256: a.module_sha256,
        })
    }

    /// The call on operands (q, k_cache, v_cache, tables, ctx, qpos) of this shape;
    /// `sharding`: the `mhlo.sharding` of the call (`{manual}` inside an SPMD region).
    pub fn emit(&self, b: &mut Block, operands: [&V; 6], sharding: Option<&str>) -> V {
        let sh = sharding
            .map(|s| format!(", mhlo.sharding = \"{s}\""))
            .unwrap_or_default();
        match &self.body {
            Body::Custom { order, attrs } => {
                let ops: Vec<&V> = order.iter().map(|&i| operands[i]).collect();
                b.custom_call(
                    "tpu_custom_call",
                    &ops,
                    &format!("{attrs}{sh}"),
                    self.shape.result_type(),
                )
            }
            Body::Functions { prefix, .. } => b.call(
                &format!("{prefix}main"),
                &operands,
                &sh,
                self.shape.result_type(),
            ),
        }
    }

    /// Functions the step's module must hold for this call (a `cpu` artifact's).
    pub fn functions(&self) -> Option<&str> {
        match &self.body {
            Body::Functions { text, .. } => Some(text),
            Body::Custom { .. } => None,
        }
    }
}

/// A TPU artifact's one custom call: which of main's arguments it takes, in what order, and
/// its attributes.
fn custom_call(m: &str, call: &str) -> Result<Body, String> {
    let line = m
        .lines()
        .find(|l| l.contains(call))
        .ok_or("no tpu_custom_call")?;
    let after = &line[line.find(call).ok_or("no call")? + call.len()..];
    let close = after.find(')').ok_or("unterminated operand list")?;
    let order = after[..close]
        .split(',')
        .map(|o| {
            o.trim()
                .strip_prefix("%arg")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n < 6)
                .ok_or_else(|| format!("operand `{}` is not an argument of main", o.trim()))
        })
        .collect::<Result<Vec<usize>, String>>()?;
    let mut seen = order.clone();
    seen.sort_unstable();
    if seen != [0, 1, 2, 3, 4, 5] {
        return Err(format!("the call takes main's arguments {order:?}"));
    }
    let rest = after[close + 1..].trim_start();
    let end = rest
        .rfind("} : (")
        .ok_or("no attributes before the call's types")?;
    let attrs = rest
        .strip_prefix('{')
        .map(|r| &r[..end - 1])
        .ok_or("no attributes on the call")?;
    if !attrs.contains("backend_config") {
        return Err("the call has no backend_config".into());
    }
    Ok(Body::Custom {
        order,
        attrs: attrs.to_string(),
    })
}

/// A `cpu` artifact's functions, renamed so that they cannot clash with the step's own or
/// another artifact's: every `@name(` of a function the module defines gets the prefix, and
/// `main` becomes private.
fn functions(m: &str, sha: &str) -> Result<Body, String> {
    let prefix = format!("tpk_{}_", sha.get(..12).unwrap_or(sha));
    let start = m
        .find("  func.func ")
        .ok_or("the module has no functions")?;
    let end = m.rfind('}').ok_or("unterminated module")?;
    let mut text = m[start..end].replace("func.func public @main(", "func.func private @main(");
    let mut names: Vec<&str> = m
        .match_indices("func.func ")
        .filter_map(|(i, _)| {
            let rest = &m[i..];
            let at = rest.find('@')?;
            let open = rest[at..].find('(')?;
            Some(&rest[at + 1..at + open])
        })
        .collect();
    if !names.contains(&"main") {
        return Err("the module has no `main`".into());
    }
    // Longest first, so that no name is rewritten inside a longer one's reference.
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for n in names {
        text = text.replace(&format!("@{n}("), &format!("@{prefix}{n}("));
    }
    Ok(Body::Functions { prefix, text })
}

/// The kernels a configuration has artifacts for, by shape.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AttentionKernels {
    calls: BTreeMap<AttentionShape, KernelCall>,
}

impl AttentionKernels {
    /// Reads the artifacts of `shapes` from `dir`; each shape without a usable one comes
    /// back with the reason.
    pub fn load(
        dir: &Path,
        shapes: &[AttentionShape],
    ) -> (AttentionKernels, Vec<(AttentionShape, String)>) {
        let mut k = AttentionKernels::default();
        let mut missing = Vec::new();
        for s in shapes {
            if k.calls.contains_key(s) {
                continue;
            }
            let path = dir.join(s.file_name());
            let call = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|text| {
                    KernelCall::from_artifact(&text).map_err(|e| format!("{}: {e}", path.display()))
                })
                .and_then(|c| {
                    if &c.shape == s {
                        Ok(c)
                    } else {
                        Err(format!("{}: holds {:?}", path.display(), c.shape))
                    }
                });
            match call {
                Ok(c) => {
                    k.calls.insert(s.clone(), c);
                }
                Err(e) => missing.push((s.clone(), e)),
            }
        }
        (k, missing)
    }

    pub fn insert(&mut self, call: KernelCall) {
        self.calls.insert(call.shape.clone(), call);
    }

    pub fn get(&self, s: &AttentionShape) -> Option<&KernelCall> {
        self.calls.get(s)
    }

    pub fn len(&self) -> usize {
        self.calls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// Attention of a bucket's query tiles through the kernel (the StableHLO attention's inputs;
/// the kernel reads each tile's own context, so the step's chunk count is not used). Returns
/// the output `[T, heads·D]` in f32, as the StableHLO attention does.
pub(crate) fn attention(b: &mut Block, cfg: &ProgramConfig, call: &KernelCall, a: &Attend) -> V {
    let (q, pos, tables, bbase) = (a.q, a.pos, a.tables, a.bbase);
    let s = &call.shape;
    let m = &cfg.dims;
    let (t, d, kvh) = (q.dims()[0], m.head_dim, m.kv_heads);
    let (nt, r, g) = (s.tiles, s.rows, s.group);
    let w = cfg.weight_elem.elem();
    // q as [tiles, KV heads, rows · group, D]: a KV head's query heads for row 0, row 1, …
    let q5 = b.reshape(q, &[nt, r, kvh, g, d]);
    let q5 = b.convert(&q5, w);
    let q5 = b.transpose(&q5, &[0, 2, 1, 3, 4]);
    let qk = b.reshape(&q5, &[nt, kvh, r * g, d]);
    // Pages of the stacked cache: the layer's blocks.
    let base = b.broadcast(bbase, tables.dims(), &[]);
    let pages = b.add(tables, &base);
    // Keys a tile reads: its last row's position + 1 (rows of a tile are one sequence's).
    let qpos = b.reshape(pos, &[nt, r]);
    let lowest = b.constant_int(i32::MIN as i64, &[], Elem::I32);
    let last = b.reduce(&qpos, &lowest, &[1], "maximum");
    let one = b.constant_int(1, &[nt], Elem::I32);
    let ctx = b.add(&last, &one);
    let qpos = b.broadcast(&qpos, &[nt, r, g], &[0, 1]);
    let qpos = b.reshape(&qpos, &[nt, r * g, 1]);
    let (kc, vc) = (a.kc, a.vc);
    let o = if cfg.tp == 1 {
        call.emit(b, [&qk, kc, vc, &pages, &ctx, &qpos], None)
    } else {
        // Each chip's KV heads: q, the caches and the output split on axis 1, the rest whole.
        let split = crate::program::split_sharding(cfg.tp, 1, 4);
        let local = |b: &mut Block, x: &V, sharding: &str| -> V {
            let x = b.shard(x, sharding);
            let mut dims = x.dims().to_vec();
            if sharding != "{replicated}" {
                dims[1] /= cfg.tp;
            }
            b.custom_call(
                "SPMDFullToShardShape",
                &[&x],
                "mhlo.sharding = \"{manual}\"",
                Ty::new(&dims, x.ty.elem),
            )
        };
        let ql = local(b, &qk, &split);
        let kl = local(b, kc, &split);
        let vl = local(b, vc, &split);
        let pl = local(b, &pages, "{replicated}");
        let cl = local(b, &ctx, "{replicated}");
        let ppl = local(b, &qpos, "{replicated}");
        let ol = call.emit(b, [&ql, &kl, &vl, &pl, &cl, &ppl], Some("{manual}"));
        let ol = b.shard(&ol, "{manual}");
        b.custom_call(
            "SPMDShardToFullShape",
            &[&ol],
            &format!("mhlo.sharding = \"{split}\""),
            qk.ty.clone(),
        )
    };
    let o = b.reshape(&o, &[nt, kvh, r, g, d]);
    let o = b.transpose(&o, &[0, 2, 1, 3, 4]);
    let o = b.reshape(&o, &[t, m.heads * d]);
    b.convert(&o, Elem::F32)
}

/// Pages of layer 0 the self-check fills with random K and V (at most).
const CHECK_PAGES: i64 = 64;

/// The start-up self-check of `call` (bucket `b`'s kernel): a program over the runner's own
/// caches (donated and returned, like a step's) that fills the first pages of layer 0 with
/// random K and V, builds random queries in tiles over those pages (contexts of different
/// lengths, across chunk and page boundaries), and runs both the kernel and the StableHLO
/// attention on them. Outputs: the caches, then max |kernel − StableHLO| and max |StableHLO|.
/// The pages it writes are free blocks at start-up: a sequence reads only positions it
/// wrote itself, so what the check leaves there is never read.
pub fn check_program(cfg: &ProgramConfig, b: Bucket, call: &KernelCall) -> String {
    use crate::hlo::{module, Arg};
    let s = &call.shape;
    let m = &cfg.dims;
    let cache_ty = Ty::new(&cfg.cache_dims(), cfg.cache_elem);
    let cache_sharding = crate::program::arg_sharding(crate::program::arg::K_CACHE, cfg.tp);
    let args: Vec<Arg> = (0..2)
        .map(|i| Arg {
            ty: cache_ty.clone(),
            attrs: vec![
                format!("mhlo.sharding = \"{cache_sharding}\""),
                format!("tf.aliasing_output = {i} : i32"),
            ],
        })
        .collect();
    let text = module("attention_check", cfg.tp as usize, &args, |blk, a| {
        let (kvh, bs, d) = (m.kv_heads, cfg.block_size, m.head_dim);
        let pages = CHECK_PAGES.min(cfg.num_blocks);
        let random = |blk: &mut Block, dims: &[i64], key: i64| -> V {
            let n: i64 = dims.iter().product();
            let idx = blk.iota(&[n], 0, Elem::U32);
            let keys = blk.constant_int(key, &[n], Elem::U32);
            let u = uniform_hash(blk, &keys, &idx, &[n]);
            let two = blk.constant_f32(2.0, &[n]);
            let one = blk.constant_f32(1.0, &[n]);
            let x = blk.mul(&u, &two);
            let x = blk.sub(&x, &one);
            blk.reshape(&x, dims)
        };
        let zero = blk.constant_int(0, &[], Elem::I32);
        let z4 = [&zero, &zero, &zero, &zero];
        let mut caches = Vec::new();
        for (i, c) in a.iter().enumerate() {
            let r = random(blk, &[pages, kvh, bs, d], 11 + i as i64);
            let r = blk.convert(&r, cfg.cache_elem);
            let r = blk.shard(&r, &cache_sharding);
            caches.push(blk.dynamic_update_slice(c, &r, &z4));
        }
        let t = b.tokens;
        let q = random(blk, &[t, m.heads * d], 7);
        // Tile i: its table's page j is (7 i + 3 j) mod pages; its context
        // 1 + (37 i + 11) mod (the table's tokens), its rows the last `rows` positions.
        let (nt, r, tp) = (s.tiles, s.rows, s.table_pages);
        let ti = blk.iota(&[nt, tp], 0, Elem::I32);
        let tj = blk.iota(&[nt, tp], 1, Elem::I32);
        let c7 = blk.constant_int(7, &[nt, tp], Elem::I32);
        let c3 = blk.constant_int(3, &[nt, tp], Elem::I32);
        let cp = blk.constant_int(pages, &[nt, tp], Elem::I32);
        let x = blk.mul(&ti, &c7);
        let y = blk.mul(&tj, &c3);
        let x = blk.add(&x, &y);
        let tables = blk.binary("remainder", &x, &cp);
        let span = tp * bs;
        let ctx_of = |i: i64| 1 + (37 * i + 11) % span;
        let ctxs: Vec<i64> = (0..nt).map(ctx_of).collect();
        let pos: Vec<i64> = ctxs
            .iter()
            .flat_map(|&c| (0..r).map(move |k| (c - r + k).max(0)))
            .collect();
        let pos = blk.constant_ints(&pos, Elem::I32);
        let longest = ctxs.iter().copied().max().unwrap_or(1);
        let chunk = cfg.chunk_blocks(b) * bs;
        let nchunks = blk.constant_int((longest + chunk - 1) / chunk, &[], Elem::I32);
        let at = Attend {
            q: &q,
            kc: &caches[0],
            vc: &caches[1],
            pos: &pos,
            tables: &tables,
            nchunks: &nchunks,
            bbase: &zero,
        };
        let got = attention(blk, cfg, call, &at);
        let (want, kc, vc) =
            crate::program::attention(blk, cfg, b.tile, cfg.chunk_blocks(b), None, &at);
        let diff = blk.sub(&got, &want);
        let zero_f = blk.constant_f32(0.0, &[]);
        let abs = |blk: &mut Block, x: &V| -> V {
            let neg = blk.unary("negate", x);
            let big = blk.max(x, &neg);
            blk.reduce(&big, &zero_f, &[0, 1], "maximum")
        };
        let err = abs(blk, &diff);
        let size = abs(blk, &want);
        vec![
            (kc, Some(cache_sharding.clone())),
            (vc, Some(cache_sharding.clone())),
            (err, Some("{replicated}".into())),
            (size, Some("{replicated}".into())),
        ]
    });
    with_functions(text, Some(call))
}

/// A grid step's fixed cost on a TPU TensorCore (the Pallas TPU guide's figure for a
/// pipelined kernel's iteration).
pub const GRID_STEP_SECONDS: f64 = 0.35e-6;
/// Issuing one DMA (a page's K or V, every KV head of it): assumed, not measured (no TPU
/// here).
pub const DMA_ISSUE_SECONDS: f64 = 10e-9;
/// From the call's first DMA to its data in VMEM (exposed once: the kernel keeps the next
/// chunk in flight across tiles): assumed, not measured.
pub const DMA_LATENCY_SECONDS: f64 = 1e-6;

/// The kernel's cost by tpuserve's own model: the TPU compiler's cost analysis does not see
/// inside a Mosaic kernel (it charges the call the blocks its grid moves and a flat ~2k
/// cycles), so a step model prices the kernel from what it reads and computes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelPrice {
    pub bytes: f64,
    pub flops: f64,
    pub seconds: f64,
}

impl AttentionShape {
    /// One call whose tiles read `ctx[i]` tokens of context each (one entry per tile), on a
    /// chip reading HBM at `bandwidth` bytes/s and multiplying at `peak` flop/s: the call's
    /// fixed cost and one exposed copy latency (its one grid step walks every tile with the
    /// next chunk in flight), then per chunk of every tile the slowest of its pages' bytes
    /// (every KV head), its dots and issuing its copies (one of K and one of V per page,
    /// each with all of the page's KV heads).
    pub fn price(&self, ctx: &[i64], bandwidth: f64, peak: f64) -> KernelPrice {
        let elem = self.elem().bytes() as f64;
        let page_elem = self.cache_elem().bytes() as f64;
        let chunk = self.chunk_pages * self.page_size;
        let rg = (self.rows * self.group) as f64;
        let d = self.head_dim as f64;
        let heads = self.kv_heads as f64;
        let chunk_bytes = heads * 2.0 * chunk as f64 * d * page_elem;
        let chunk_flops = heads * 4.0 * rg * chunk as f64 * d;
        let chunk_dmas = 2.0 * self.chunk_pages as f64;
        let per_chunk = (chunk_bytes / bandwidth)
            .max(chunk_flops / peak)
            .max(chunk_dmas * DMA_ISSUE_SECONDS);
        let q_out = heads * 2.0 * rg * d * elem;
        let mut p = KernelPrice {
            bytes: 0.0,
            flops: 0.0,
            seconds: GRID_STEP_SECONDS + DMA_LATENCY_SECONDS,
        };
        for &c in ctx {
            let chunks = ((c.max(0) + chunk - 1) / chunk) as f64;
            p.bytes += chunks * chunk_bytes + q_out;
            p.flops += chunks * chunk_flops;
            p.seconds += chunks * per_chunk;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::WeightElem;

    /// 16 query heads over 8 KV heads (tiny-llama3's ratio), 2 layers.
    fn config(tp: usize) -> ProgramConfig {
        let text = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":16,
            "num_key_value_heads":8,"vocab_size":256,"max_position_embeddings":512}"#;
        let c = tpuserve_model::LlamaConfig::from_hf_str(text, Path::new("config.json")).unwrap();
        ProgramConfig::for_model(&c, tp, WeightElem::BF16, 63, 16, 256, 64)
    }

    const BUCKET: Bucket = Bucket {
        tokens: 32,
        tile: 16,
        top_k: 0,
    };

    /// An artifact as `lower.artifact` writes it, the call taking main's arguments in the
    /// kernel's order (scalar prefetch first).
    fn artifact(shape: &AttentionShape) -> String {
        let tys: Vec<String> = shape.operand_types().iter().map(Ty::mlir).collect();
        let sig: Vec<String> = tys
            .iter()
            .enumerate()
            .map(|(i, t)| format!("%arg{i}: {t}"))
            .collect();
        let order = [3, 4, 0, 5, 1, 2];
        let ops: Vec<String> = order.iter().map(|i| format!("%arg{i}")).collect();
        let op_tys: Vec<&str> = order.iter().map(|&i| tys[i].as_str()).collect();
        let r = shape.result_type().mlir();
        let module = format!(
            "module @jit__lambda attributes {{mhlo.num_partitions = 1 : i32}} {{\n  \
             func.func public @main({}) -> ({r} {{jax.result_info = \"result\"}}) {{\n    \
             %0 = stablehlo.custom_call @tpu_custom_call({}) {{backend_config = \"{{\\22custom_call_config\\22: {{}}}}\", kernel_name = \"_kernel\", operand_layouts = [dense<[1, 0]> : tensor<2xindex>]}} : ({}) -> {r}\n    \
             return %0 : {r}\n  }}\n}}\n",
            sig.join(", "),
            ops.join(", "),
            op_tys.join(", ")
        );
        serde_json::json!({
            "format": 1, "kernel": "paged_attention", "jax": "0.10.2",
            "target": "TPU v6 lite", "shape": shape, "module_sha256": "00",
            "module": module,
        })
        .to_string()
    }

    #[test]
    fn shapes_follow_the_bucket_and_the_chips() {
        let s = AttentionShape::of(&config(2), BUCKET).unwrap();
        assert_eq!((s.tiles, s.rows, s.kv_heads, s.group), (2, 16, 4, 2));
        assert_eq!((s.pages, s.page_size, s.chunk_pages), (2 * 64, 16, 4));
        assert_eq!(s.table_pages % s.chunk_pages, 0);
        let decode = Bucket { tile: 1, ..BUCKET };
        let d = AttentionShape::of(&config(1), decode).unwrap();
        assert_eq!((d.tiles, d.rows, d.kv_heads), (32, 1, 8));
        assert_eq!(
            d.file_name(),
            "paged_attention-t32-h8-r1-g2-d4-p16-n128-b16-c4-bfloat16.json"
        );
        // An fp8 cache: its own operand type and file name; the bf16 shape's JSON and name
        // are as before (no `cache_dtype` key).
        let fp8 = config(1).with_kv_cache(crate::quant::KvCacheDtype::Fp8E4m3);
        let f = AttentionShape::of(&fp8, decode).unwrap();
        assert_eq!(f.cache_dtype.as_deref(), Some("float8_e4m3fn"));
        assert_eq!(
            f.file_name(),
            "paged_attention-t32-h8-r1-g2-d4-p16-n128-b16-c4-bfloat16-kvfloat8_e4m3fn.json"
        );
        let types = f.operand_types();
        assert_eq!(
            (types[0].elem, types[1].elem, types[2].elem),
            (Elem::BF16, Elem::F8E4M3FN, Elem::F8E4M3FN)
        );
        assert!(!serde_json::to_string(&d).unwrap().contains("cache_dtype"));
        let back: AttentionShape =
            serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
        // Half the page bytes of the bf16 cache.
        let (pb, pf) = (
            d.price(&[64; 32], 1e12, 1e15),
            f.price(&[64; 32], 1e12, 1e15),
        );
        assert!(
            pf.bytes < pb.bytes && pf.bytes > 0.45 * pb.bytes,
            "{pf:?} {pb:?}"
        );
    }

    #[test]
    fn an_artifact_is_read_and_checked_against_its_shape() {
        let s = AttentionShape::of(&config(2), BUCKET).unwrap();
        let call = KernelCall::from_artifact(&artifact(&s)).unwrap();
        let Body::Custom { order, attrs } = &call.body else {
            panic!("a TPU artifact is a custom call")
        };
        assert_eq!(order, &[3, 4, 0, 5, 1, 2]);
        assert!(attrs.starts_with("backend_config = "), "{attrs}");
        assert!(attrs.ends_with("tensor<2xindex>]"), "{attrs}");
        assert_eq!(call.target, "TPU v6 lite");

        // A module of other shapes than its label, another format, two calls: refused.
        let mut other = s.clone();
        other.tiles = 4;
        let lying = artifact(&other).replace("\"tiles\":4", "\"tiles\":2");
        let e = KernelCall::from_artifact(&lying).unwrap_err();
        assert!(e.contains("operands"), "{e}");
        let v2 = artifact(&s).replace("\"format\":1", "\"format\":2");
        assert!(KernelCall::from_artifact(&v2)
            .unwrap_err()
            .contains("format 2"));
        let a = artifact(&s);
        let two = a.replace(
            "return %0",
            "%1 = stablehlo.custom_call @tpu_custom_call(%arg0) {}\\n    return %0",
        );
        assert!(KernelCall::from_artifact(&two).is_err());
        assert!(KernelCall::from_artifact("{}").is_err());
    }

    #[test]
    fn missing_artifacts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(2);
        let s = AttentionShape::of(&cfg, BUCKET).unwrap();
        let d = AttentionShape::of(&cfg, Bucket { tile: 1, ..BUCKET }).unwrap();
        std::fs::write(dir.path().join(s.file_name()), artifact(&s)).unwrap();
        // An artifact under another shape's name is not taken for it.
        std::fs::write(dir.path().join(d.file_name()), artifact(&s)).unwrap();
        let (k, missing) = AttentionKernels::load(dir.path(), &[s.clone(), d.clone()]);
        assert!(k.get(&s).is_some());
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].0, d);
        assert!(missing[0].1.contains("holds"), "{}", missing[0].1);
    }

    /// The emitted step: one call per layer loop on each chip's shard, with exactly the
    /// kernel's operand types in the kernel's order, and no StableHLO attention left.
    #[test]
    fn the_call_is_spliced_into_the_step_per_chip() {
        for tp in [1usize, 2] {
            let cfg = config(tp);
            let s = AttentionShape::of(&cfg, BUCKET).unwrap();
            let mut k = AttentionKernels::default();
            k.insert(KernelCall::from_artifact(&artifact(&s)).unwrap());
            let with = cfg.clone().with_attention_kernels(k);
            let text = with.emit(BUCKET);
            let calls: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("call_target_name = \"tpu_custom_call\""))
                .collect();
            assert_eq!(calls.len(), 1, "tp {tp}");
            let tys: Vec<String> = s.operand_types().iter().map(Ty::mlir).collect();
            let want: Vec<&str> = [3, 4, 0, 5, 1, 2]
                .iter()
                .map(|&i| tys[i].as_str())
                .collect();
            let sig = &calls[0][calls[0].rfind(" : (").unwrap()..];
            assert_eq!(
                sig,
                format!(" : ({}) -> {}", want.join(", "), s.result_type().mlir())
            );
            let manual = text.matches("SPMDFullToShardShape").count();
            assert_eq!(manual, if tp == 1 { 0 } else { 6 }, "tp {tp}");
            assert_eq!(text.matches("SPMDShardToFullShape").count(), manual.min(1));
            assert!(calls[0].contains("mhlo.sharding = \"{manual}\"") == (tp > 1));
            // The StableHLO attention's exponentials (online softmax) are gone; sampling's
            // remain in the tail either way.
            let exps = |t: &str| t.matches("stablehlo.exponential").count();
            assert!(exps(&text) < exps(&cfg.emit(BUCKET)));
            // A bucket without an artifact keeps the StableHLO attention.
            let decode = Bucket { tile: 1, ..BUCKET };
            assert!(!with.emit(decode).contains("tpu_custom_call"));
        }
    }

    #[test]
    fn the_price_grows_with_context_and_grid_steps() {
        let s = AttentionShape::of(&config(1), Bucket { tile: 1, ..BUCKET }).unwrap();
        let (bw, peak) = (1.64e12, 918e12);
        let short = s.price(&vec![64; 32], bw, peak);
        let long = s.price(&vec![640; 32], bw, peak);
        assert!(long.bytes > 9.0 * short.bytes && long.seconds > short.seconds);
        // Fixed cost: one grid step; then 32 tiles × one chunk, each issuing 2 copies a page.
        let fixed = GRID_STEP_SECONDS + DMA_LATENCY_SECONDS;
        let issue = 32.0 * 2.0 * s.chunk_pages as f64 * DMA_ISSUE_SECONDS;
        assert!((short.seconds - fixed - issue).abs() < 1e-12, "{short:?}");
        // Bytes: every chunk read whole, K and V of 8 KV heads, bf16.
        let chunk = (s.chunk_pages * s.page_size) as f64;
        let q_out = 8.0 * 2.0 * 2.0 * 4.0 * 2.0;
        assert_eq!(short.bytes, 32.0 * (8.0 * 2.0 * chunk * 4.0 * 2.0 + q_out));
    }
}
