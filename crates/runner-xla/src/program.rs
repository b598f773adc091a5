//! The Llama forward step as one StableHLO program per shape bucket. Layers run in a
//! `stablehlo.while` over weights stacked on a leading layer axis, so a program's size (and
//! compile time) does not grow with depth. The KV caches are donated arguments updated by
//! scatter. Attention runs by query tile (one sequence's rows: one row for a decoding
//! sequence, up to `tile` rows of a prompt) and reads the tile's pages chunk by chunk with
//! an online softmax, so each page is read once per tile and a step reads the context it
//! has, not a bucket's worth.
//!
//! Sharding (tensor parallel over `tp` devices, Megatron style): q/k/v/gate/up split by output
//! rows, o/down by input columns, embedding and LM head by vocabulary rows, KV caches by the
//! KV-head axis. GSPMD inserts the collectives.
//!
//! With int8 weights ([`Quantization::Int8`]) the projections and the LM head are int8
//! arguments with per-output-channel scales (extra arguments after all others); each dot
//! converts the int8 matrix to the activation dtype as its operand and scales its f32 result.

use crate::hlo::{module, Arg, Block, Cmp, Elem, Ty, V};
pub use crate::quant::{KvCacheDtype, Quantization};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelDims {
    pub hidden: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub inter: i64,
    pub vocab: i64,
    pub layers: i64,
    pub eps: String,
}

/// Rows of logits computed per iteration of the LM-head loop in prompt buckets (a prompt
/// chunk needs one row per sequence, unless prompt logprobs are asked for).
pub const LOGIT_CHUNK: i64 = 16;
/// The most rows of logits one iteration computes in decode buckets, where every row needs
/// them: each iteration reads the whole LM head, so a decode step of up to this many rows
/// reads it once; beyond, the [rows, vocab] f32 temporaries would grow past a few % of HBM.
pub const DECODE_LOGIT_CHUNK: i64 = 128;

impl Bucket {
    /// Rows of logits per iteration of the LM-head loop.
    pub fn logit_chunk(&self) -> i64 {
        if self.tile == 1 {
            self.tokens.min(DECODE_LOGIT_CHUNK)
        } else {
            LOGIT_CHUNK.min(self.tokens)
        }
    }
}

/// The fewest rows a sequence-parallel step has (see [`ProgramConfig::seq_parallel`]).
pub const SEQ_PARALLEL_ROWS: i64 = 64;

/// One compiled shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket {
    /// Token rows per execution.
    pub tokens: i64,
    /// Query rows per attention tile: 1 (every row is its own sequence: decode) or the
    /// prefill tile (a prompt's rows in groups that share one read of their pages).
    pub tile: i64,
    /// Top-k alternatives computed per row (0 or the maximum logprobs).
    pub top_k: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProgramConfig {
    pub dims: ModelDims,
    /// The activations', the KV cache's and the unquantised weights' dtype.
    pub weight_elem: WeightElem,
    pub quantization: Quantization,
    /// The KV cache's element type (`weight_elem`'s unless `--kv-cache-dtype` says fp8).
    pub cache_elem: Elem,
    pub num_blocks: i64,
    pub block_size: i64,
    pub tp: i64,
    /// Columns of the block table (the longest context's blocks, rounded up to a chunk).
    pub table_blocks: i64,
    /// KV blocks read per attention iteration (the least; see [`ProgramConfig::chunk_blocks`]).
    pub kv_chunk: i64,
    /// Bytes of K and V one attention iteration may gather per chip (query tiles × context
    /// tokens × a token's K and V of one layer): buckets with few tiles read bigger chunks,
    /// up to this (0: every bucket reads `kv_chunk` blocks).
    pub kv_chunk_budget: i64,
    /// The Pallas attention kernel's calls, by shape (`--attention-backend pallas`): a
    /// bucket whose shape has one runs it in place of the StableHLO attention.
    pub attention_kernels: Option<std::sync::Arc<crate::pallas::AttentionKernels>>,
}

/// A step written out without its loops, for the cost model: XLA's cost analysis counts a
/// `while` body once, so `plan --cost` compiles the step with `layers` layers and `chunks`
/// KV chunks as straight-line code and takes differences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unroll {
    pub layers: i64,
    pub chunks: i64,
    /// With the LM head and sampling tail; without it the program ends at the last layer's
    /// hidden states (outputs: K cache, V cache, hidden). The model compiles the tail on its
    /// own: in one program with the layers, the compiler fuses and shards the tail a little
    /// differently for each layer count, and differences of such variants are not a layer's
    /// or a chunk's cost.
    pub tail: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightElem {
    F32,
    BF16,
}

impl WeightElem {
    pub fn elem(self) -> Elem {
        match self {
            WeightElem::F32 => Elem::F32,
            WeightElem::BF16 => Elem::BF16,
        }
    }
}

/// Argument order of every program (weights first, then cache, then per-step inputs).
pub mod arg {
    pub const EMBED: usize = 0;
    pub const FINAL_NORM: usize = 1;
    pub const LM_HEAD: usize = 2;
    pub const IN_NORM: usize = 3;
    pub const WQ: usize = 4;
    pub const WK: usize = 5;
    pub const WV: usize = 6;
    pub const WO: usize = 7;
    pub const POST_NORM: usize = 8;
    pub const WG: usize = 9;
    pub const WU: usize = 10;
    pub const WD: usize = 11;
    pub const INV_FREQ: usize = 12;
    pub const K_CACHE: usize = 13;
    pub const V_CACHE: usize = 14;
    pub const TOKENS: usize = 15;
    pub const POSITIONS: usize = 16;
    pub const SLOTS: usize = 17;
    pub const BLOCKS: usize = 18;
    pub const TARGETS: usize = 19;
    pub const TEMPERATURE: usize = 20;
    pub const RNG_KEYS: usize = 21;
    /// Rows (token indices) that need logits, padded; and how many are real.
    pub const LOGIT_ROWS: usize = 22;
    pub const NUM_LOGIT_ROWS: usize = 23;
    /// Per-row filters of random sampling: top-k (0 = off), top-p (1 = off), min-p (0 = off).
    pub const TOP_K: usize = 24;
    pub const TOP_P: usize = 25;
    pub const MIN_P: usize = 26;
    /// KV chunks the attention loop runs (the longest context in the step, in chunks).
    pub const KV_CHUNKS: usize = 27;
    /// Structured outputs: the allowed tokens of each logit row, packed 32 per i32
    /// (`[T, ceil(vocab / 32)]`, by logit-row order), and whether any row is constrained
    /// (when not, the mask is neither read nor applied).
    pub const MASK: usize = 28;
    pub const MASK_ON: usize = 29;
    /// Arguments of a program without quantised weights.
    pub const COUNT: usize = 30;
    pub const NUM_WEIGHTS: usize = 13;
    /// int8 programs only: the f32 per-output-channel scales of the quantised matrices (LM
    /// head `[vocab]`, projections `[L, out]`), after every other argument so that the
    /// indices above mean the same in every program.
    pub const S_LM_HEAD: usize = 30;
    pub const S_WQ: usize = 31;
    pub const S_WK: usize = 32;
    pub const S_WV: usize = 33;
    pub const S_WO: usize = 34;
    pub const S_WG: usize = 35;
    pub const S_WU: usize = 36;
    pub const S_WD: usize = 37;
    /// Arguments of an int8 program.
    pub const COUNT_INT8: usize = 38;

    /// The scale argument of a quantised weight argument.
    pub fn scale_of(weight: usize) -> Option<usize> {
        Some(match weight {
            LM_HEAD => S_LM_HEAD,
            WQ => S_WQ,
            WK => S_WK,
            WV => S_WV,
            WO => S_WO,
            WG => S_WG,
            WU => S_WU,
            WD => S_WD,
            _ => return None,
        })
    }
}

/// Output order: caches, then per-row results.
pub mod out {
    pub const K_CACHE: usize = 0;
    pub const V_CACHE: usize = 1;
    pub const SAMPLED: usize = 2;
    pub const SAMPLED_LOGPROB: usize = 3;
    pub const SAMPLED_RANK: usize = 4;
    pub const TARGET_LOGPROB: usize = 5;
    pub const TARGET_RANK: usize = 6;
    pub const TOP_IDS: usize = 7;
    pub const TOP_LOGPROBS: usize = 8;
}

/// The sharding of each weight argument (GSPMD notation), for `tp` devices.
pub fn arg_sharding(index: usize, tp: i64) -> String {
    if tp == 1 {
        return "{replicated}".into();
    }
    let d = |axis, rank| split_sharding(tp, axis, rank);
    match index {
        arg::EMBED => d(0, 2),
        arg::LM_HEAD => d(1, 2),
        arg::WQ => d(1, 3),
        arg::WK | arg::WV | arg::WG | arg::WU => d(2, 3),
        arg::WO | arg::WD => d(1, 3),
        // Scales follow their matrix's output axis: split with the column-parallel ones and
        // the vocabulary, whole beside the row-parallel ones (whose output is not split).
        arg::S_LM_HEAD => d(0, 1),
        arg::S_WQ | arg::S_WK | arg::S_WV | arg::S_WG | arg::S_WU => d(1, 2),
        // The KV-head axis is its own dimension, from the buffer to the attention dot, so
        // GSPMD never has to all-gather or copy the cache to reshape it (see the KV write in
        // the layer for why the layout is [blocks, KV heads, block_size, head_dim]).
        arg::K_CACHE | arg::V_CACHE => d(1, 4),
        _ => "{replicated}".into(),
    }
}

/// The GSPMD sharding of a rank-`rank` array split `tp` ways along `axis`, whole along the
/// others: `{devices=[1,tp,1]<=[tp]}` for axis 1 of 3.
pub fn split_sharding(tp: i64, axis: usize, rank: usize) -> String {
    let dims: Vec<String> = (0..rank)
        .map(|i| {
            if i == axis {
                tp.to_string()
            } else {
                "1".into()
            }
        })
        .collect();
    format!("{{devices=[{}]<=[{tp}]}}", dims.join(","))
}

impl ProgramConfig {
    /// The programs of `c` at `tp`, with `num_blocks` usable KV blocks (one more is added:
    /// the write target of padding tokens), contexts up to `max_model_len`, and attention
    /// reading about `kv_chunk_tokens` of context per iteration.
    pub fn for_model(
        c: &tpuserve_model::LlamaConfig,
        tp: usize,
        weight_elem: WeightElem,
        num_blocks: usize,
        block_size: usize,
        max_model_len: usize,
        kv_chunk_tokens: usize,
    ) -> ProgramConfig {
        let max_blocks = max_model_len.div_ceil(block_size).max(1);
        let kv_chunk = (kv_chunk_tokens / block_size).clamp(1, max_blocks);
        ProgramConfig {
            table_blocks: (max_blocks.div_ceil(kv_chunk) * kv_chunk) as i64,
            kv_chunk: kv_chunk as i64,
            kv_chunk_budget: 0,
            attention_kernels: None,
            dims: ModelDims {
                hidden: c.hidden_size as i64,
                heads: c.num_attention_heads as i64,
                kv_heads: c.num_key_value_heads as i64,
                head_dim: c.head_dim as i64,
                inter: c.intermediate_size as i64,
                vocab: c.vocab_size as i64,
                layers: c.num_hidden_layers as i64,
                eps: format!("{:e}", c.rms_norm_eps),
            },
            weight_elem,
            quantization: Quantization::None,
            cache_elem: weight_elem.elem(),
            num_blocks: num_blocks as i64 + 1,
            block_size: block_size as i64,
            tp: tp as i64,
        }
    }

    /// The same programs with attention chunks grown for buckets with few query tiles, up to
    /// `bytes` of K and V gathered per chip an iteration (see [`ProgramConfig::chunk_blocks`]).
    pub fn with_kv_chunk_budget(mut self, bytes: usize) -> ProgramConfig {
        self.kv_chunk_budget = bytes as i64;
        self
    }

    /// Bytes of one token's K and V in one layer's cache on one chip.
    pub fn kv_token_bytes(&self) -> i64 {
        2 * (self.dims.kv_heads / self.tp) * self.dims.head_dim * self.cache_elem.bytes() as i64
    }

    /// KV blocks bucket `b`'s attention reads per iteration: `kv_chunk`, doubled while the
    /// K and V the bucket's query tiles gather for the chunk stay within `kv_chunk_budget`
    /// bytes and the chunk divides the block table (a chunk never runs past it), up to 2,048
    /// tokens. An iteration has a fixed cost on TPU of ~19k cycles and 14 launches (70B TP 8,
    /// 16 rows, deviceless v6e:2x4) whatever it reads, so a 16-row decode step at 2,048 tokens
    /// of context spent more on eight iterations' overhead than on reading its pages. The
    /// budget is in bytes because the cost of a chunk jumps once its gathered pages outgrow
    /// ~134 MB (8B TP 1, where a token's K and V of a layer are 4 KiB a chip: 100k cycles for
    /// 134 MB, 448k for 268 MB), while 70B at TP 8 (512 bytes a token) kept growing cheaply:
    /// 128 decode rows × 512 tokens, 41k cycles against 30k for 256 tokens.
    ///
    /// The chunk's f32 scores (every row of every tile × the chip's query heads) stay within
    /// half the budget as well: 70B at TP 8 with 2,048-row prompt steps (tiles of 16, 128
    /// tiles) scored 134 MB a chunk at 2,048 tokens, and the TPU compiler refused the bucket
    /// ("Too many buffers are colored in the alternate memory", deviceless v6e:2x4). Every
    /// bucket up to 512 rows is unchanged by it (at most 32 MiB of scores).
    pub fn chunk_blocks(&self, b: Bucket) -> i64 {
        let tiles = (b.tokens / b.tile.max(1)).max(1);
        let grown = |token_bytes, budget| {
            grown_chunk(
                self.kv_chunk,
                self.block_size,
                self.table_blocks,
                token_bytes,
                budget,
            )
        };
        let heads = self.dims.heads / self.tp;
        grown(tiles * self.kv_token_bytes(), self.kv_chunk_budget).min(grown(
            tiles * b.tile.max(1) * heads * 4,
            self.kv_chunk_budget / 2,
        ))
    }

    /// Whether `b`'s residual stream is split by rows across the chips (sequence parallel):
    /// at TP > 1 when the rows divide evenly. Each chip then adds, normalises and keeps in
    /// f32 only its 1/TP of the rows; the sums of wo and wd arrive by reduce-scatter and the
    /// normalised rows leave by all-gather, the same bytes over ICI as one all-reduce.
    /// Replicated, every chip ran each layer's two norms and residual adds over all rows
    /// (70B TP 8, 512-row prompt chunk: ~20 % of a layer's cycles, deviceless v6e).
    /// From 64 rows: below, the norms are too small to pay for the extra collectives
    /// (70B TP 8 deviceless v6e, greedy step, 8 layers, every collective charged at 200 GB/s:
    /// +1 % at 16 and 32 rows; −2 % at 64, −3 % at 128, −6 % at 256, −17 % at 512 rows. The
    /// first figures, −6 % to −34 %, were taken while the model missed the reduce-scatters.)
    pub fn seq_parallel(&self, b: Bucket) -> bool {
        self.tp > 1 && b.tokens % self.tp == 0 && b.tokens >= SEQ_PARALLEL_ROWS
    }

    /// The same programs with the Pallas kernel's attention in every bucket `kernels` has
    /// a call for.
    pub fn with_attention_kernels(
        mut self,
        kernels: crate::pallas::AttentionKernels,
    ) -> ProgramConfig {
        self.attention_kernels = Some(std::sync::Arc::new(kernels));
        self
    }

    /// The kernel call bucket `b` runs, if any.
    pub fn kernel_for(&self, b: Bucket) -> Option<&crate::pallas::KernelCall> {
        let k = self.attention_kernels.as_ref()?;
        k.get(&crate::pallas::AttentionShape::of(self, b).ok()?)
    }

    /// The same programs with the projections and LM head stored as `q`.
    pub fn with_quantization(mut self, q: Quantization) -> ProgramConfig {
        self.quantization = q;
        self
    }

    /// The same programs with the KV cache stored as `kv` (converted on write, and back to
    /// the activations' dtype inside the attention's dots).
    pub fn with_kv_cache(mut self, kv: KvCacheDtype) -> ProgramConfig {
        self.cache_elem = kv.elem(self.weight_elem.elem());
        self
    }

    pub fn arg_count(&self) -> usize {
        if self.quantization.is_int8() {
            arg::COUNT_INT8
        } else {
            arg::COUNT
        }
    }

    /// The arguments the runner holds for the whole run, in the order it keeps them: the
    /// weights, then (int8) their scales.
    pub fn weight_args(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..arg::NUM_WEIGHTS).collect();
        if self.quantization.is_int8() {
            v.extend(arg::S_LM_HEAD..arg::COUNT_INT8);
        }
        v
    }

    pub fn slots(&self) -> i64 {
        self.num_blocks * self.block_size
    }

    /// One cache (K or V): `[layers × blocks, KV heads, block_size, head_dim]`.
    pub fn cache_dims(&self) -> [i64; 4] {
        let m = &self.dims;
        [
            m.layers * self.num_blocks,
            m.kv_heads,
            self.block_size,
            m.head_dim,
        ]
    }

    pub fn kv_width(&self) -> i64 {
        self.dims.kv_heads * self.dims.head_dim
    }

    pub fn arg_types(&self, b: Bucket) -> Vec<Ty> {
        let m = &self.dims;
        let w = self.weight_elem.elem();
        // The matrices the dots read: int8 when quantised.
        let mw = if self.quantization.is_int8() {
            Elem::I8
        } else {
            w
        };
        let (l, h, t) = (m.layers, m.hidden, b.tokens);
        let qs = m.heads * m.head_dim;
        let kvs = self.kv_width();
        let mut types = vec![
            Ty::new(&[m.vocab, h], w),
            Ty::new(&[h], Elem::F32),
            Ty::new(&[h, m.vocab], mw),
            Ty::new(&[l, h], Elem::F32),
            Ty::new(&[l, qs, h], mw),
            Ty::new(&[l, h, kvs], mw),
            Ty::new(&[l, h, kvs], mw),
            Ty::new(&[l, qs, h], mw),
            Ty::new(&[l, h], Elem::F32),
            Ty::new(&[l, h, m.inter], mw),
            Ty::new(&[l, h, m.inter], mw),
            Ty::new(&[l, m.inter, h], mw),
            Ty::new(&[m.head_dim / 2], Elem::F32),
            Ty::new(&self.cache_dims(), self.cache_elem),
            Ty::new(&self.cache_dims(), self.cache_elem),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[t / b.tile, self.table_blocks], Elem::I32),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[t], Elem::F32),
            Ty::new(&[t], Elem::U32),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[], Elem::I32),
            Ty::new(&[t], Elem::I32),
            Ty::new(&[t], Elem::F32),
            Ty::new(&[t], Elem::F32),
            Ty::new(&[], Elem::I32),
            Ty::new(&[t, mask_words(m.vocab)], Elem::I32),
            Ty::new(&[], Elem::I32),
        ];
        if self.quantization.is_int8() {
            // Per output channel, as `arg::S_*`.
            let f = Elem::F32;
            types.extend([
                Ty::new(&[m.vocab], f),
                Ty::new(&[l, qs], f),
                Ty::new(&[l, kvs], f),
                Ty::new(&[l, kvs], f),
                Ty::new(&[l, h], f),
                Ty::new(&[l, m.inter], f),
                Ty::new(&[l, m.inter], f),
                Ty::new(&[l, h], f),
            ]);
        }
        types
    }

    /// The StableHLO text of the step program for one bucket.
    pub fn emit(&self, b: Bucket) -> String {
        self.emit_with(b, None)
    }

    /// The step without its loops (see [`Unroll`]); only for cost analysis.
    pub fn emit_unrolled(&self, b: Bucket, u: Unroll) -> String {
        self.emit_with(b, Some(u))
    }

    fn emit_with(&self, b: Bucket, unroll: Option<Unroll>) -> String {
        let args: Vec<Arg> = self
            .arg_types(b)
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                let mut attrs = vec![format!("mhlo.sharding = \"{}\"", arg_sharding(i, self.tp))];
                if i == arg::K_CACHE {
                    attrs.push("tf.aliasing_output = 0 : i32".into());
                }
                if i == arg::V_CACHE {
                    attrs.push("tf.aliasing_output = 1 : i32".into());
                }
                Arg { ty, attrs }
            })
            .collect();
        let cache_sharding = arg_sharding(arg::K_CACHE, self.tp);
        let text = module("llama_step", self.tp as usize, &args, |blk, a| {
            let mut e = Emitter {
                cfg: self,
                b,
                blk,
                unroll,
            };
            let outs = e.forward(a);
            outs.into_iter()
                .enumerate()
                .map(|(i, v)| {
                    let sh = if i < 2 {
                        cache_sharding.clone()
                    } else {
                        "{replicated}".to_string()
                    };
                    (v, Some(sh))
                })
                .collect()
        });
        crate::pallas::with_functions(text, self.kernel_for(b))
    }
}

struct Emitter<'a> {
    cfg: &'a ProgramConfig,
    b: Bucket,
    blk: &'a mut Block,
    unroll: Option<Unroll>,
}

impl Emitter<'_> {
    fn forward(&mut self, a: &[V]) -> Vec<V> {
        let m = self.cfg.dims.clone();
        let t = self.b.tokens;
        let w = self.cfg.weight_elem.elem();
        let blk = &mut *self.blk;

        // Embedding rows for the step's tokens.
        let x0 = blk.take_rows(&a[arg::EMBED], &a[arg::TOKENS]);
        let sp = self.cfg.seq_parallel(self.b);
        let x0 = if sp {
            // The vocab-sharded table's partial rows, reduce-scattered by rows.
            blk.shard(&x0, &split_sharding(self.cfg.tp, 0, 2))
        } else {
            x0
        };
        let x0 = blk.convert(&x0, Elem::F32);

        // Rotary angles per token: position × inverse frequency.
        let half = m.head_dim / 2;
        let pos = blk.convert(&a[arg::POSITIONS], Elem::F32);
        let pos = blk.broadcast(&pos, &[t, half], &[0]);
        let inv = blk.broadcast(&a[arg::INV_FREQ], &[t, half], &[1]);
        let ang = blk.mul(&pos, &inv);
        let cos = blk.unary("cosine", &ang);
        let sin = blk.unary("sine", &ang);

        // Where the step's K / V rows go: a block of the layer's cache and an offset in it.
        // Which rows write which slots of each row's page is the same in every layer (the
        // layers' blocks differ by a constant), so it is worked out once, here: a [C, BS, T]
        // comparison (C pages, see `page_candidates`) that cost a 512-row prompt layer ~6 %
        // of its time when it was done in every layer (70B TP 8, v6e).
        let bs_c = blk.constant_int(self.cfg.block_size, &[t], Elem::I32);
        let q_blk = blk.div(&a[arg::SLOTS], &bs_c);
        let blk_off = blk.mul(&q_blk, &bs_c);
        let woff = blk.sub(&a[arg::SLOTS], &blk_off);
        let pages = page_candidates(
            blk,
            &q_blk,
            self.b.tile,
            self.cfg.block_size,
            self.cfg.num_blocks - 1,
        );
        let pw = page_write(blk, &pages, &q_blk, &woff, self.cfg.block_size);

        let zero = blk.constant_int(0, &[], Elem::I32);
        let mut init: Vec<&V> = vec![&zero, &x0, &a[arg::K_CACHE], &a[arg::V_CACHE]];
        // Everything the body reads is carried, so the loop body captures nothing.
        let carried_consts: Vec<&V> = vec![
            &a[arg::IN_NORM],
            &a[arg::WQ],
            &a[arg::WK],
            &a[arg::WV],
            &a[arg::WO],
            &a[arg::POST_NORM],
            &a[arg::WG],
            &a[arg::WU],
            &a[arg::WD],
            &cos,
            &sin,
            &a[arg::POSITIONS],
            &pw.blocks,
            &a[arg::BLOCKS],
            &a[arg::KV_CHUNKS],
            &pw.from,
            &pw.hit,
        ];
        init.extend(carried_consts.iter().copied());
        if self.cfg.quantization.is_int8() {
            // After everything else, so the layer finds the other values where it always does.
            init.extend(a[arg::S_WQ..=arg::S_WD].iter());
        }
        let layers = m.layers;
        let cfg = self.cfg.clone();
        let bucket = self.b;
        let unroll = self.unroll;
        let outs = if let Some(u) = unroll {
            let mut v: Vec<V> = init.iter().map(|&x| x.clone()).collect();
            for li in 0..u.layers {
                v[0] = blk.constant_int(li, &[], Elem::I32);
                let mut le = Emitter {
                    cfg: &cfg,
                    b: bucket,
                    blk,
                    unroll,
                };
                let (x, kc, vc) = le.layer(&v);
                (v[1], v[2], v[3]) = (x, kc, vc);
            }
            v
        } else {
            blk.while_loop(
                &init,
                |c, v| {
                    let n = c.constant_int(layers, &[], Elem::I32);
                    c.compare(Cmp::Lt, &v[0], &n)
                },
                |body, v| {
                    let mut le = Emitter {
                        cfg: &cfg,
                        b: bucket,
                        blk: body,
                        unroll: None,
                    };
                    let (x, kc, vc) = le.layer(v);
                    let one = le.blk.constant_int(1, &[], Elem::I32);
                    let i2 = le.blk.add(&v[0], &one);
                    let mut out = vec![i2, x, kc, vc];
                    out.extend(v[4..].iter().cloned());
                    out
                },
            )
        };
        let (x, kc, vc) = (&outs[1], &outs[2], &outs[3]);
        if unroll.is_some_and(|u| !u.tail) {
            return vec![kc.clone(), vc.clone(), x.clone()];
        }
        let blk = &mut *self.blk;
        let h = rms_norm(blk, x, &a[arg::FINAL_NORM], &m.eps);
        let hw = blk.convert(&h, w);
        // The LM head reads every row: gathered from the chips' row shards.
        let hw = if sp {
            blk.shard(&hw, "{replicated}")
        } else {
            hw
        };

        // Logits only for the rows that need them, `logit_chunk` rows per loop iteration: the
        // LM head and the sampling tail cost what the step asks for, not the token bucket.
        let k = self.b.top_k;
        let zero_i = blk.constant_int(0, &[t], Elem::I32);
        let zero_f = blk.constant_f32(0.0, &[t]);
        let mut acc: Vec<V> = vec![
            zero_i.clone(),
            zero_f.clone(),
            zero_i.clone(),
            zero_f.clone(),
            zero_i.clone(),
        ];
        if k > 0 {
            acc.push(blk.constant_int(0, &[t, k], Elem::I32));
            acc.push(blk.constant_f32(0.0, &[t, k]));
        }
        let c0 = blk.constant_int(0, &[], Elem::I32);
        let mut init: Vec<&V> = vec![
            &c0,
            &a[arg::NUM_LOGIT_ROWS],
            &hw,
            &a[arg::LM_HEAD],
            &a[arg::LOGIT_ROWS],
            &a[arg::TEMPERATURE],
            &a[arg::RNG_KEYS],
            &a[arg::TARGETS],
            &a[arg::TOP_K],
            &a[arg::TOP_P],
            &a[arg::MIN_P],
            &a[arg::MASK],
            &a[arg::MASK_ON],
        ];
        let int8 = self.cfg.quantization.is_int8();
        if int8 {
            init.push(&a[arg::S_LM_HEAD]);
        }
        // Carried inputs before the accumulators.
        let inputs = init.len();
        debug_assert_eq!(inputs, LOOP_INPUTS + int8 as usize);
        init.extend(acc.iter());
        let cfg = self.cfg.clone();
        let bucket = self.b;
        let outs = blk.while_loop(
            &init,
            |c, v| {
                let step = c.constant_int(bucket.logit_chunk(), &[], Elem::I32);
                let start = c.mul(&v[0], &step);
                c.compare(Cmp::Lt, &start, &v[1])
            },
            |body, v| {
                let r = bucket.logit_chunk();
                let step = body.constant_int(r, &[], Elem::I32);
                let start = body.mul(&v[0], &step);
                let rows = body.dynamic_slice(&v[4], &[&start], &[r]);
                let hr = body.take_rows(&v[2], &rows);
                let head = if int8 {
                    body.convert(&v[3], hr.ty.elem)
                } else {
                    v[3].clone()
                };
                let logits = body.dot_general(&hr, &head, (&[], &[]), (&[1], &[0]), Elem::F32);
                let logits = if int8 {
                    let s = body.broadcast(&v[LOOP_INPUTS], logits.dims(), &[1]);
                    body.mul(&logits, &s)
                } else {
                    logits
                };
                let logits = if cfg.tp > 1 {
                    // Computed and sampled vocab-sharded where the LM head lives: left alone,
                    // GSPMD all-gathers the whole LM head instead; gathered, every chip ran
                    // the whole sampling tail on every row's full vocabulary (about 55 passes
                    // over [rows, vocab] f32). Sharded, each chip reads its 1/TP of it and
                    // the reductions over the vocabulary end in small all-reduces.
                    body.shard(&logits, &split_sharding(cfg.tp, 1, 2))
                } else {
                    logits
                };
                let logits = apply_token_mask(body, &logits, &v[11], &v[12], &start);
                let pick_rows = |body: &mut Block, x: &V| -> V {
                    let x2 = body.reshape(x, &[x.dims()[0], 1]);
                    let g = body.take_rows(&x2, &rows);
                    body.reshape(&g, &[r])
                };
                let temp = pick_rows(body, &v[5]);
                let keys = pick_rows(body, &v[6]);
                let targets = pick_rows(body, &v[7]);
                let filters = Filters {
                    top_k: pick_rows(body, &v[8]),
                    top_p: pick_rows(body, &v[9]),
                    min_p: pick_rows(body, &v[10]),
                };
                let mut e = Emitter {
                    cfg: &cfg,
                    b: bucket,
                    blk: body,
                    unroll: None,
                };
                let outs = e.sample_outputs(&logits, &temp, &keys, &targets, &filters, r);
                let one = body.constant_int(1, &[], Elem::I32);
                let z = body.constant_int(0, &[], Elem::I32);
                let mut next = vec![body.add(&v[0], &one)];
                next.extend(v[1..inputs].iter().cloned());
                for (acc, o) in v[inputs..].iter().zip(&outs) {
                    let starts: Vec<&V> = if o.dims().len() == 2 {
                        vec![&start, &z]
                    } else {
                        vec![&start]
                    };
                    next.push(body.dynamic_update_slice(acc, o, &starts));
                }
                next
            },
        );
        let mut res = vec![kc.clone(), vc.clone()];
        res.extend(outs[inputs..].iter().cloned());
        res
    }

    /// One decoder layer; `v` are the carried loop values.
    fn layer(&mut self, v: &[V]) -> (V, V, V) {
        let cfg = self.cfg;
        let m = &cfg.dims;
        let t = self.b.tokens;
        let w = cfg.weight_elem.elem();
        let (h, d, nh, kvh) = (m.hidden, m.head_dim, m.heads, m.kv_heads);
        let (i, x, kc, vc) = (&v[0], &v[1], &v[2], &v[3]);
        let in_norm = &v[4];
        let (wq, wk, wv, wo) = (&v[5], &v[6], &v[7], &v[8]);
        let post_norm = &v[9];
        let (wg, wu, wd) = (&v[10], &v[11], &v[12]);
        // pages: the blocks within a layer's cache the step rewrites; from / hit: see
        // `PageWrite`.
        let (cos, sin, pos, pages) = (&v[13], &v[14], &v[15], &v[16]);
        let (tables, nchunks) = (&v[17], &v[18]);
        let (from, hit) = (&v[19], &v[20]);
        // int8: the stacked scales of wq, wk, wv, wo, wg, wu, wd, carried after the rest.
        let scales = cfg.quantization.is_int8().then(|| &v[21..28]);
        let sp = cfg.seq_parallel(self.b);
        // Sequence parallel: a norm's rows, in the dots' dtype, all-gathered from the chips'
        // row shards (once for q, k and v; once for gate and up).
        let gather_rows = |b: &mut Block, x: &V| -> V {
            let xw = b.convert(x, w);
            if sp {
                b.shard(&xw, "{replicated}")
            } else {
                xw
            }
        };
        let b = &mut *self.blk;
        let z = b.constant_int(0, &[], Elem::I32);

        let layer_vec = |b: &mut Block, stacked: &V| -> V {
            let s = b.dynamic_slice(stacked, &[i, &z], &[1, stacked.dims()[1]]);
            b.reshape(&s, &[stacked.dims()[1]])
        };
        let layer_mat = |b: &mut Block, stacked: &V| -> V {
            let (r, c) = (stacked.dims()[1], stacked.dims()[2]);
            let s = b.dynamic_slice(stacked, &[i, &z, &z], &[1, r, c]);
            b.reshape(&s, &[r, c])
        };
        // x [T, in] · w [in, out], accumulated in f32 (weights are stored [in, out], the
        // layout XLA's dot wants without a transpose), except wq (`which` 0), stored
        // [out, in] as in the checkpoint: its output is split into heads for RoPE and the
        // attention, and the TPU compiler lays that dot out heads-major; from [in, out] it
        // copied the layer's whole Q slice into [out, in] every layer (~33 MB per layer per
        // chip at 70B TP 8, deviceless v6e:2x4). An int8 matrix enters the dot converted
        // to the activation dtype (a convert XLA fuses into the dot's operand, so the int8
        // bytes are what is read) and its per-channel scales multiply the f32 result.
        // `which` is the matrix's place in the int8 scales (wq 0, …, wd 6).
        // wo (3) and wd (6) are split by their input across chips: each chip's product is a
        // partial sum that GSPMD all-reduces. With bf16 weights the partial sums leave the
        // dot as bf16 (accumulated in f32 inside it), so the all-reduce moves half the bytes
        // over ICI (at 70B TP 8, 128 rows: 8.4 → 4.2 MB a layer), as vLLM's all-reduce does;
        // f32 weights keep f32 sums (the goldens are exact there).
        let split_by_input = |which: usize| cfg.tp > 1 && (which == 3 || which == 6);
        let reduced_elem = |which: usize| {
            if split_by_input(which) && w == Elem::BF16 {
                Elem::BF16
            } else {
                Elem::F32
            }
        };
        let linear = |b: &mut Block, x: &V, wt: &V, which: usize| -> V {
            let xw = b.convert(x, w);
            // Sequence parallel: wo's and wd's inputs stay split by columns, as their
            // weights' rows are, so the dot is local and its sums are reduce-scattered.
            // Unconstrained, GSPMD moved the input to row shards instead and gathered the
            // whole weight on every chip at some shapes (70B TP 8, 16–128-row prompt tiles:
            // the full 8192 × 8192 wo read per layer per chip).
            let xw = if sp && split_by_input(which) {
                b.shard(&xw, &split_sharding(cfg.tp, 1, 2))
            } else {
                xw
            };
            // wq [heads, D, in] contracts its last axis; the rest [in, out] their first.
            let rc: &[i64] = if which == 0 { &[2] } else { &[0] };
            let out = reduced_elem(which);
            let flat = |b: &mut Block, y: &V| -> V {
                let n: i64 = y.dims()[1..].iter().product();
                let y = b.reshape(y, &[y.dims()[0], n]);
                b.convert(&y, Elem::F32)
            };
            // wo's and wd's partial sums are reduced right at the dot, in the dot's output
            // dtype: replicated, or split by rows (sequence parallel: a reduce-scatter).
            // Left to find the all-reduce's place, GSPMD put wo's after the convert to f32
            // (70B TP 8 deviceless: an f32 [rows, 8192] all-reduce a layer).
            let reduce_here = |b: &mut Block, y: V| -> V {
                if !split_by_input(which) {
                    y
                } else if sp {
                    b.shard(&y, &split_sharding(cfg.tp, 0, 2))
                } else if out == Elem::BF16 {
                    // The barrier keeps the convert to f32 after the all-reduce: the
                    // compiler folded it into the dot ahead of the all-reduce otherwise.
                    let y = b.shard(&y, "{replicated}");
                    let ty = y.ty.clone();
                    b.generic("optimization_barrier", &[&y], "", ty)
                } else {
                    y
                }
            };
            let Some(scales) = scales else {
                let y = b.dot_general(&xw, wt, (&[], &[]), (&[1], rc), out);
                let y = reduce_here(b, y);
                return flat(b, &y);
            };
            let wt = b.convert(wt, w);
            let y = b.dot_general(&xw, &wt, (&[], &[]), (&[1], rc), out);
            let y = reduce_here(b, y);
            let y = flat(b, &y);
            let s = layer_vec(b, &scales[which]);
            let s = b.broadcast(&s, y.dims(), &[1]);
            b.mul(&y, &s)
        };

        let g_in = layer_vec(b, in_norm);
        let hn = rms_norm(b, x, &g_in, &m.eps);
        let hn = gather_rows(b, &hn);
        // wq's layer is sliced from the stack seen as [L, heads, D, in] and enters the dot
        // as [heads, D, in], the form the compiler gives it for the heads-major output: a
        // slice reshaped after the dynamic-slice (splitting out into heads) made the TPU
        // compiler copy the layer's Q matrix out of the stack every layer (16.8 MB per chip
        // at 70B TP 8, ~71k of a 128-row layer's ~520k cycles, deviceless v6e:2x4).
        let q_w = {
            let (out, inp) = (wq.dims()[1], wq.dims()[2]);
            let heads = out / d;
            let stacked = b.reshape(wq, &[wq.dims()[0], heads, d, inp]);
            let s = b.dynamic_slice(&stacked, &[i, &z, &z, &z], &[1, heads, d, inp]);
            b.reshape(&s, &[heads, d, inp])
        };
        let q = linear(b, &hn, &q_w, 0);
        let k_w = layer_mat(b, wk);
        let k = linear(b, &hn, &k_w, 1);
        let vv_w = layer_mat(b, wv);
        let vv = linear(b, &hn, &vv_w, 2);
        let q = rope(b, &q, t, nh, d, cos, sin);
        let k = rope(b, &k, t, kvh, d, cos, sin);

        // KV write: the cache is [L × blocks, KVH, BS, D]; token t goes to block
        // (layer × blocks + slot / BS), offset slot % BS, one [D] row per KV head. The cache
        // is never reshaped (on TPU a reshape that splits or merges a tiled axis copies the
        // whole cache) and a block is one contiguous [KVH, BS, D] slice, the unit of every
        // gather. Each head's page is a [BS, D] matrix, the TPU's (sublane, lane) tile and the
        // attention dots' operand as it is: with KVH between BS and D (the layout before),
        // 2 KV heads per chip (70B at TP 4) padded every tile and the compiler copied the
        // whole cache into the dots' layout after every write. The write goes a whole block
        // at a time (`write_pages`): a scatter of single rows is a loop on TPU.
        let nb_total = b.constant_int(cfg.num_blocks, &[], Elem::I32);
        let bbase = b.mul(i, &nb_total);
        let bbase_t = b.broadcast(&bbase, pages.dims(), &[]);
        let pw = PageWrite {
            blocks: b.add(pages, &bbase_t),
            from: from.clone(),
            hit: hit.clone(),
        };
        let kw = b.convert(&k, cfg.cache_elem);
        let vw = b.convert(&vv, cfg.cache_elem);
        let kw = b.reshape(&kw, &[t, kvh, d]);
        let vw = b.reshape(&vw, &[t, kvh, d]);
        let kc2 = write_pages(b, kc, &pw, &kw);
        let vc2 = write_pages(b, vc, &pw, &vw);

        let at = Attend {
            q: &q,
            kc: &kc2,
            vc: &vc2,
            pos,
            tables,
            nchunks,
            bbase: &bbase,
        };
        let (o, kc2, vc2) = match cfg.kernel_for(self.b) {
            // The kernel only reads the caches: they go on as they are.
            Some(call) => (
                crate::pallas::attention(b, cfg, call, &at),
                kc2.clone(),
                vc2.clone(),
            ),
            None => attention(
                b,
                cfg,
                self.b.tile,
                cfg.chunk_blocks(self.b),
                self.unroll.map(|u| u.chunks),
                &at,
            ),
        };
        let attn_w = layer_mat(b, wo);
        let attn = linear(b, &o, &attn_w, 3);
        let x1 = b.add(x, &attn);

        let g_post = layer_vec(b, post_norm);
        let hn2 = rms_norm(b, &x1, &g_post, &m.eps);
        let hn2 = gather_rows(b, &hn2);
        let gate_w = layer_mat(b, wg);
        let gate = linear(b, &hn2, &gate_w, 4);
        let up_w = layer_mat(b, wu);
        let up = linear(b, &hn2, &up_w, 5);
        let sig = b.unary("logistic", &gate);
        let act = b.mul(&gate, &sig);
        let act = b.mul(&act, &up);
        // The SwiGLU product is written out in the dots' dtype before wd reads it: left to
        // fuse, the TPU compiler recomputed silu(g) · u from the two f32 inputs inside wd's
        // dot (70B TP 8, 2,048-row prompt: wd 463k estimated cycles a layer against gate's
        // 264k for the same flops; 385k + 41k written out; decode steps unchanged;
        // deviceless v6e).
        let act = b.convert(&act, w);
        let ty = act.ty.clone();
        let act = b.generic("optimization_barrier", &[&act], "", ty);
        let down_w = layer_mat(b, wd);
        let down = linear(b, &act, &down_w, 6);
        let x2 = b.add(&x1, &down);
        let _ = h;
        (x2, kc2, vc2)
    }

    /// Greedy / temperature sampling, logprobs of the chosen and target tokens, ranks, top-k.
    fn sample_outputs(
        &mut self,
        logits: &V,
        temp: &V,
        keys: &V,
        targets: &V,
        filters: &Filters,
        t: i64,
    ) -> Vec<V> {
        let b = &mut *self.blk;
        let vocab = self.cfg.dims.vocab;
        let ninf = b.constant_f32(f32::NEG_INFINITY, &[]);
        let zero_f = b.constant_f32(0.0, &[]);
        let rowmax = b.reduce(logits, &ninf, &[1], "maximum");
        let rowmax_b = b.broadcast(&rowmax, &[t, vocab], &[0]);
        let shifted = b.sub(logits, &rowmax_b);
        let ex = b.unary("exponential", &shifted);
        let sum = b.reduce(&ex, &zero_f, &[1], "add");
        let lse = b.unary("log", &sum);
        let lse = b.add(&lse, &rowmax);
        let lse_b = b.broadcast(&lse, &[t, vocab], &[0]);
        let logprobs = b.sub(logits, &lse_b);
        let iota = b.iota(&[t, vocab], 1, Elem::I32);

        // Temperature sampling by Gumbel-max with per-row keys hashed with the vocab index;
        // skipped at run time when every row is greedy. The branch also picks the token's
        // logprob: with the pick outside, the TPU compiler sank part of it into a clone of
        // the whole conditional and ran both (the filters' bisections twice per step).
        let zero_t = b.constant_f32(0.0, &[t]);
        let is_random = b.compare(Cmp::Gt, temp, &zero_t);
        let greedy_tok = argmax(b, logits, &iota, t, vocab);
        let any_random = any(b, &is_random);
        let chosen = b.if_else(
            &any_random,
            |b| {
                let keys = b.broadcast(keys, &[t, vocab], &[0]);
                let iota = b.iota(&[t, vocab], 1, Elem::I32);
                let idx_u = b.convert(&iota, Elem::U32);
                let u = uniform_hash(b, &keys, &idx_u, &[t, vocab]);
                let lnu = b.unary("log", &u);
                let neg = b.unary("negate", &lnu);
                let lnn = b.unary("log", &neg);
                let gumbel = b.unary("negate", &lnn);
                let tiny = b.constant_f32(1e-6, &[t]);
                let tsafe = b.max(temp, &tiny);
                let tb = b.broadcast(&tsafe, &[t, vocab], &[0]);
                let scaled = b.div(logits, &tb);
                let scaled = filters.apply(b, &scaled, t, vocab);
                let noisy = b.add(&scaled, &gumbel);
                let random_tok = argmax(b, &noisy, &iota, t, vocab);
                let tok = b.select(&is_random, &random_tok, &greedy_tok);
                let lp = pick(b, &logprobs, &iota, &tok, t, vocab);
                vec![tok, lp]
            },
            |b| {
                let iota = b.iota(&[t, vocab], 1, Elem::I32);
                let lp = pick(b, &logprobs, &iota, &greedy_tok, t, vocab);
                vec![greedy_tok.clone(), lp]
            },
        );
        let (sampled, sampled_lp) = (chosen[0].clone(), chosen[1].clone());
        let zero_ti = b.constant_int(0, &[t], Elem::I32);
        // The rank of the sampled token is reported only with logprobs (the top-k variant).
        let sampled_rank = if self.b.top_k > 0 {
            rank_of(b, logits, &iota, &sampled, t, vocab)
        } else {
            zero_ti.clone()
        };
        // Prompt-logprob targets (-1 on rows without one).
        let has_target = b.compare(Cmp::Ge, targets, &zero_ti);
        let any_target = any(b, &has_target);
        let tr = b.if_else(
            &any_target,
            |b| {
                let iota = b.iota(&[t, vocab], 1, Elem::I32);
                let lsm = {
                    let lse_b = b.broadcast(&lse, &[t, vocab], &[0]);
                    b.sub(logits, &lse_b)
                };
                vec![
                    pick(b, &lsm, &iota, targets, t, vocab),
                    rank_of(b, logits, &iota, targets, t, vocab),
                ]
            },
            |b| {
                vec![
                    b.constant_f32(0.0, &[t]),
                    b.constant_int(0, &[t], Elem::I32),
                ]
            },
        );
        let (target_lp, target_rank) = (tr[0].clone(), tr[1].clone());

        let mut outs = vec![sampled, sampled_lp, sampled_rank, target_lp, target_rank];
        let k = self.b.top_k;
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        let mut work = logprobs.clone();
        let ninf_tv = b.constant_f32(f32::NEG_INFINITY, &[t, vocab]);
        for _ in 0..k {
            let id = argmax(b, &work, &iota, t, vocab);
            let lp = pick(b, &logprobs, &iota, &id, t, vocab);
            let id_b = b.broadcast(&id, &[t, vocab], &[0]);
            let hit = b.compare(Cmp::Eq, &iota, &id_b);
            work = b.select(&hit, &ninf_tv, &work);
            ids.push(b.reshape(&id, &[t, 1]));
            lps.push(b.reshape(&lp, &[t, 1]));
        }
        if k > 0 {
            let ids_r: Vec<&V> = ids.iter().collect();
            let lps_r: Vec<&V> = lps.iter().collect();
            outs.push(b.concat(&ids_r, 1));
            outs.push(b.concat(&lps_r, 1));
        }
        outs
    }
}

/// What one layer's attention reads: `q [T, heads·D]` (roped, f32), the layer's caches
/// (already holding this step's K/V), positions, the block table of every tile
/// `[T / tile, table_blocks]`, the number of KV chunks to read and the layer's first block row.
pub(crate) struct Attend<'a> {
    pub q: &'a V,
    pub kc: &'a V,
    pub vc: &'a V,
    pub pos: &'a V,
    pub tables: &'a V,
    pub nchunks: &'a V,
    pub bbase: &'a V,
}

/// Attention by query tile. Tile n holds rows [n·R, (n+1)·R) of one sequence; its pages are
/// read once, `kch` blocks (the bucket's chunk) per iteration of a loop that runs `nchunks` times (the
/// step's longest context, so a step reads the context it has, never a bucket's worth), with
/// an online softmax across chunks. K and V enter the dots in the cache's dtype and the dots
/// accumulate in f32. Returns the output `[T, heads·D]` and the caches (threaded through the
/// loop so that no second live reference forces a copy of them).
pub(crate) fn attention(
    b: &mut Block,
    cfg: &ProgramConfig,
    tile: i64,
    kch: i64,
    unrolled_chunks: Option<i64>,
    a: &Attend,
) -> (V, V, V) {
    let m = &cfg.dims;
    let w = cfg.weight_elem.elem();
    let (d, kvh) = (m.head_dim, m.kv_heads);
    let (g, r) = (m.heads / kvh, tile);
    let t = a.q.dims()[0];
    let nt = t / r;
    let q5 = b.reshape(a.q, &[nt, r, kvh, g, d]);
    let q5 = b.convert(&q5, w);
    let qpos = b.reshape(a.pos, &[nt, r]);
    let run = [nt, kvh, r, g];
    let m0 = b.constant_f32(-1e30, &run);
    let l0 = b.constant_f32(0.0, &run);
    let acc0 = b.constant_f32(0.0, &[nt, kvh, r, g, d]);
    let j0 = b.constant_int(0, &[], Elem::I32);
    let (acc, l, kc, vc) = if let Some(n) = unrolled_chunks {
        let (mut mm, mut ll, mut acc) = (m0, l0, acc0);
        for j in 0..n {
            let jv = b.constant_int(j, &[], Elem::I32);
            let c = Chunk {
                kch,
                j: &jv,
                m: &mm,
                l: &ll,
                acc: &acc,
                kc: a.kc,
                vc: a.vc,
                q5: &q5,
                qpos: &qpos,
                tables: a.tables,
                bbase: a.bbase,
            };
            (mm, ll, acc) = attend_chunk(b, cfg, &c);
        }
        (acc, ll, a.kc.clone(), a.vc.clone())
    } else {
        let init = [
            &j0, &m0, &l0, &acc0, a.kc, a.vc, &q5, &qpos, a.tables, a.bbase, a.nchunks,
        ];
        let outs = b.while_loop(
            &init,
            |c, v| c.compare(Cmp::Lt, &v[0], &v[10]),
            |body, v| {
                let c = Chunk {
                    kch,
                    j: &v[0],
                    m: &v[1],
                    l: &v[2],
                    acc: &v[3],
                    kc: &v[4],
                    vc: &v[5],
                    q5: &v[6],
                    qpos: &v[7],
                    tables: &v[8],
                    bbase: &v[9],
                };
                let (mm, ll, acc) = attend_chunk(body, cfg, &c);
                let one = body.constant_int(1, &[], Elem::I32);
                let mut out = vec![body.add(&v[0], &one), mm, ll, acc];
                out.extend(v[4..].iter().cloned());
                out
            },
        );
        (
            outs[3].clone(),
            outs[2].clone(),
            outs[4].clone(),
            outs[5].clone(),
        )
    };
    let lb = b.broadcast(&l, &[nt, kvh, r, g, d], &[0, 1, 2, 3]);
    let o = b.div(&acc, &lb);
    let o = b.transpose(&o, &[0, 2, 1, 3, 4]);
    (b.reshape(&o, &[t, m.heads * d]), kc, vc)
}

/// The running state of one attention iteration.
struct Chunk<'a> {
    /// KV blocks per iteration.
    kch: i64,
    j: &'a V,
    m: &'a V,
    l: &'a V,
    acc: &'a V,
    kc: &'a V,
    vc: &'a V,
    q5: &'a V,
    qpos: &'a V,
    tables: &'a V,
    bbase: &'a V,
}

/// Chunk `j` of every tile's pages: scores, masked to the keys at or before each query's
/// position, folded into the running max `m`, sum `l` and output `acc`.
fn attend_chunk(b: &mut Block, cfg: &ProgramConfig, c: &Chunk) -> (V, V, V) {
    let dims = &cfg.dims;
    let w = cfg.weight_elem.elem();
    let (bs, kch) = (cfg.block_size, c.kch);
    let (nt, r, kvh, g, d) = (
        c.q5.dims()[0],
        c.q5.dims()[1],
        dims.kv_heads,
        dims.heads / dims.kv_heads,
        dims.head_dim,
    );
    let ck = kch * bs;
    let z = b.constant_int(0, &[], Elem::I32);
    let kch_c = b.constant_int(kch, &[], Elem::I32);
    let start = b.mul(c.j, &kch_c);
    let tbl = b.dynamic_slice(c.tables, &[&z, &start], &[nt, kch]);
    let base = b.broadcast(c.bbase, &[nt, kch], &[]);
    let rows = b.add(&tbl, &base);
    // [NT, KVH, kch·BS, D]: whole blocks, each head's pages the cache's own [BS, D] tiles
    // stacked, so merging (kch, BS) is free and the scores' minor axis is the chunk's
    // kch·BS keys: lane-dense on TPU (with BS = 16 as the minor axis every score vreg was
    // 16 of 128 lanes, 8× the bytes in every pass over the scores).
    let kg = b.gather_pages(c.kc, &rows);
    let vg = b.gather_pages(c.vc, &rows);
    let kg = b.reshape(&kg, &[nt, kvh, ck, d]);
    let vg = b.reshape(&vg, &[nt, kvh, ck, d]);
    // An fp8 cache enters the dots widened to the activations' dtype (a convert the
    // compiler fuses into the dot's operand: the fp8 bytes are what is read).
    let kg = b.convert(&kg, w);
    let vg = b.convert(&vg, w);

    // scores [NT, KVH, R, G, kch·BS]
    let full = [nt, kvh, r, g, ck];
    let s = b.dot_general(c.q5, &kg, (&[0, 2], &[0, 1]), (&[4], &[3]), Elem::F32);
    let scale = b.constant_f32(1.0 / (d as f32).sqrt(), &full);
    let s = b.mul(&s, &scale);
    let ck_c = b.constant_int(ck, &[], Elem::I32);
    let first = b.mul(c.j, &ck_c);
    let first = b.broadcast(&first, &full, &[]);
    let key_pos = b.iota(&full, 4, Elem::I32);
    let key_pos = b.add(&key_pos, &first);
    let qp = b.broadcast(c.qpos, &full, &[0, 2]);
    let visible = b.compare(Cmp::Le, &key_pos, &qp);
    let ninf = b.constant_f32(f32::NEG_INFINITY, &full);
    let s = b.select(&visible, &s, &ninf);

    // Online softmax: m starts finite (-1e30), so a chunk with every key masked leaves
    // m, l and acc as they were instead of producing NaN.
    let keep = [0, 1, 2, 3];
    let lowest = b.constant_f32(f32::NEG_INFINITY, &[]);
    let mc = b.reduce(&s, &lowest, &[4], "maximum");
    let m_new = b.max(c.m, &mc);
    let mb = b.broadcast(&m_new, &full, &keep);
    let p = b.sub(&s, &mb);
    let p = b.unary("exponential", &p);
    let corr = b.sub(c.m, &m_new);
    let corr = b.unary("exponential", &corr);
    let zero = b.constant_f32(0.0, &[]);
    let psum = b.reduce(&p, &zero, &[4], "add");
    let l = b.mul(c.l, &corr);
    let l = b.add(&l, &psum);
    let p6 = b.convert(&p, w);
    // [NT, KVH, R, G, D]
    let pv = b.dot_general(&p6, &vg, (&[0, 1], &[0, 1]), (&[4], &[2]), Elem::F32);
    let cb = b.broadcast(&corr, &[nt, kvh, r, g, d], &keep);
    let acc = b.mul(c.acc, &cb);
    let acc = b.add(&acc, &pv);
    (m_new, l, acc)
}

/// Where a step's new K / V rows go, page by page. Row `r` writes block `blocks[r]` (a row of
/// the stacked cache) at offset `offs[r]`; the cache is written a whole page at a time (see
/// [`Block::scatter_pages`]): each of `C` candidate pages `blocks [C]` (every page some row
/// writes, some more than once) is rebuilt with every row of the step that writes into it:
/// `from [C, BS]` names, per slot of page `c`, the last row writing that slot (0 where none
/// does) and `hit [C, BS]` whether any does. Candidates naming the same page (a prompt's
/// tiles that share one; padding, all on the scratch block) build the same page, so the
/// scatter's repeated indices agree.
struct PageWrite {
    blocks: V,
    from: V,
    hit: V,
}

/// The pages a step writes, as candidates for [`page_write`], from each row's block `blocks
/// [T]` (within a layer's cache; `scratch` for padding rows) in tiles of `tile` rows.
/// A tile holds consecutive positions of one sequence, its padding rows last (see
/// `XlaRunner::executions`; `run_chunk` refuses a plan where it does not), so where a tile
/// is no longer than a page its rows write at most two pages: its first and its last real
/// row's. Those two a tile are the candidates: a 2,048-row prompt step in tiles of 16
/// rebuilds 256 pages, not 2,048 (70B TP 8, pages of 64: the per-row rebuild was 316k
/// estimated cycles a layer, 41k now; the cost analysis' bytes of a layer 3.44 → 2.06
/// GB; deviceless v6e). Decode rows (tiles of one) and tiles longer than a page: every row's
/// page.
fn page_candidates(b: &mut Block, blocks: &V, tile: i64, bs: i64, scratch: i64) -> V {
    let t = blocks.dims()[0];
    if tile <= 1 || tile > bs || t % tile != 0 {
        return blocks.clone();
    }
    let nt = t / tile;
    let dims = [nt, tile];
    let b2 = b.reshape(blocks, &dims);
    let pad = b.constant_int(scratch, &dims, Elem::I32);
    let is_pad = b.compare(Cmp::Eq, &b2, &pad);
    let row = b.iota(&dims, 1, Elem::I32);
    // A tile of padding only: its last row, on the scratch block.
    let last_row = b.constant_int(tile - 1, &dims, Elem::I32);
    let first_real = b.select(&is_pad, &last_row, &row);
    let init = b.constant_int(tile - 1, &[], Elem::I32);
    let first = b.reduce(&first_real, &init, &[1], "minimum");
    let zero = b.constant_int(0, &dims, Elem::I32);
    let last_real = b.select(&is_pad, &zero, &row);
    let init = b.constant_int(0, &[], Elem::I32);
    let last = b.reduce(&last_real, &init, &[1], "maximum");
    let lowest = b.constant_int(i32::MIN as i64, &dims, Elem::I32);
    let pick = |b: &mut Block, at: &V| -> V {
        let at = b.broadcast(at, &dims, &[0]);
        let here = b.compare(Cmp::Eq, &row, &at);
        let blk = b.select(&here, &b2, &lowest);
        let init = b.constant_int(i32::MIN as i64, &[], Elem::I32);
        let blk = b.reduce(&blk, &init, &[1], "maximum");
        b.reshape(&blk, &[nt, 1])
    };
    let a = pick(b, &first);
    let z = pick(b, &last);
    let both = b.concat(&[&a, &z], 1);
    b.reshape(&both, &[2 * nt])
}

/// `pages` (the candidates, [`page_candidates`]) and `blocks` may be blocks within one
/// layer's cache: only which rows write which page matters here, and the layer adds its
/// base to [`PageWrite::blocks`] for the scatter.
fn page_write(b: &mut Block, pages: &V, blocks: &V, offs: &V, bs: i64) -> PageWrite {
    let (c, t) = (pages.dims()[0], blocks.dims()[0]);
    let dims = [c, bs, t];
    // [c, s, r']: row r' writes slot s of page c.
    let blk_r = b.broadcast(pages, &dims, &[0]);
    let blk_w = b.broadcast(blocks, &dims, &[2]);
    let same = b.compare(Cmp::Eq, &blk_r, &blk_w);
    let off_w = b.broadcast(offs, &dims, &[2]);
    let slot = b.iota(&dims, 1, Elem::I32);
    let at = b.compare(Cmp::Eq, &off_w, &slot);
    let writes = b.and(&same, &at);
    let who = b.iota(&dims, 2, Elem::I32);
    let none = b.constant_int(-1, &dims, Elem::I32);
    let who = b.select(&writes, &who, &none);
    let lowest = b.constant_int(-1, &[], Elem::I32);
    let last = b.reduce(&who, &lowest, &[2], "maximum");
    let zero = b.constant_int(0, &[c, bs], Elem::I32);
    let hit = b.compare(Cmp::Ge, &last, &zero);
    let from = b.max(&last, &zero);
    PageWrite {
        blocks: pages.clone(),
        from,
        hit,
    }
}

/// The cache `[L × blocks, KVH, BS, D]` with the step's rows `[T, KVH, D]` written: each
/// candidate page is gathered, its written slots replaced, and the page scattered back whole.
fn write_pages(b: &mut Block, cache: &V, w: &PageWrite, rows: &V) -> V {
    // c pages, each of its kvh heads a [bs, d] tile.
    let (c, kvh, d) = (w.blocks.dims()[0], rows.dims()[1], rows.dims()[2]);
    let bs = cache.dims()[2];
    let idx = b.reshape(&w.blocks, &[c, 1]);
    let old = b.gather_pages(cache, &idx);
    let old = b.reshape(&old, &[c, kvh, bs, d]);
    let new = b.take_rows(rows, &w.from);
    let new = b.transpose(&new, &[0, 2, 1, 3]);
    let hit = b.broadcast(&w.hit, &[c, kvh, bs, d], &[0, 2]);
    let page = b.select(&hit, &new, &old);
    b.scatter_pages(cache, &w.blocks, &page)
}

fn rms_norm(b: &mut Block, x: &V, gain: &V, eps: &str) -> V {
    let (t, h) = (x.dims()[0], x.dims()[1]);
    let sq = b.mul(x, x);
    let zero = b.constant_f32(0.0, &[]);
    let sum = b.reduce(&sq, &zero, &[1], "add");
    let inv_n = b.constant_f32(1.0 / h as f32, &[t]);
    let mean = b.mul(&sum, &inv_n);
    let eps_v = b.constant_f32(eps.parse().unwrap_or(1e-5), &[t]);
    let var = b.add(&mean, &eps_v);
    let r = b.unary("rsqrt", &var);
    let rb = b.broadcast(&r, &[t, h], &[0]);
    let normed = b.mul(x, &rb);
    let gb = b.broadcast(gain, &[t, h], &[1]);
    b.mul(&gb, &normed)
}

/// Rotates the half-split head layout: (a, b) → (a cos − b sin, b cos + a sin).
fn rope(b: &mut Block, x: &V, t: i64, heads: i64, d: i64, cos: &V, sin: &V) -> V {
    let half = d / 2;
    let x3 = b.reshape(x, &[t, heads, d]);
    let x1 = b.slice(&x3, &[0, 0, 0], &[t, heads, half]);
    let x2 = b.slice(&x3, &[0, 0, half], &[t, heads, d]);
    let c = b.broadcast(cos, &[t, heads, half], &[0, 2]);
    let s = b.broadcast(sin, &[t, heads, half], &[0, 2]);
    let a1 = b.mul(&x1, &c);
    let a2 = b.mul(&x2, &s);
    let r1 = b.sub(&a1, &a2);
    let b1 = b.mul(&x2, &c);
    let b2 = b.mul(&x1, &s);
    let r2 = b.add(&b1, &b2);
    let r = b.concat(&[&r1, &r2], 2);
    b.reshape(&r, &[t, heads * d])
}

/// Index of the row maximum (lowest index on ties), as i32 [T].
fn argmax(b: &mut Block, x: &V, iota: &V, t: i64, vocab: i64) -> V {
    let ninf = b.constant_f32(f32::NEG_INFINITY, &[]);
    let m = b.reduce(x, &ninf, &[1], "maximum");
    let mb = b.broadcast(&m, &[t, vocab], &[0]);
    let is_max = b.compare(Cmp::Eq, x, &mb);
    let big = b.constant_int(vocab, &[t, vocab], Elem::I32);
    let cand = b.select(&is_max, iota, &big);
    let init = b.constant_int(i32::MAX as i64, &[], Elem::I32);
    b.reduce(&cand, &init, &[1], "minimum")
}

/// Whether any element of a 1-D boolean vector is true.
fn any(b: &mut Block, pred: &V) -> V {
    let n = pred.dims()[0];
    let as_i = b.convert(pred, Elem::I32);
    let zero = b.constant_int(0, &[], Elem::I32);
    let count = b.reduce(&as_i, &zero, &[0], "add");
    let _ = n;
    b.compare(Cmp::Gt, &count, &zero)
}

/// 1 + the number of entries of each row larger than `x[row, idx[row]]`.
fn rank_of(b: &mut Block, x: &V, iota: &V, idx: &V, t: i64, vocab: i64) -> V {
    let val = pick(b, x, iota, idx, t, vocab);
    let vb = b.broadcast(&val, &[t, vocab], &[0]);
    let above = b.compare(Cmp::Gt, x, &vb);
    let above_i = b.convert(&above, Elem::I32);
    let zero = b.constant_int(0, &[], Elem::I32);
    let count = b.reduce(&above_i, &zero, &[1], "add");
    let one = b.constant_int(1, &[t], Elem::I32);
    b.add(&count, &one)
}

/// `x[row, idx[row]]` for every row.
fn pick(b: &mut Block, x: &V, iota: &V, idx: &V, t: i64, vocab: i64) -> V {
    let ib = b.broadcast(idx, &[t, vocab], &[0]);
    let hit = b.compare(Cmp::Eq, iota, &ib);
    let zero = b.constant_f32(0.0, &[t, vocab]);
    let sel = b.select(&hit, x, &zero);
    let z = b.constant_f32(0.0, &[]);
    b.reduce(&sel, &z, &[1], "add")
}

/// A uniform number in (0, 1) from a 32-bit integer hash of (key, index).
pub(crate) fn uniform_hash(b: &mut Block, keys: &V, idx: &V, dims: &[i64]) -> V {
    let c = |b: &mut Block, v: u32| b.constant_int(v as i64, dims, Elem::U32);
    let m1 = c(b, 0x9E37_79B1);
    let m2 = c(b, 0x7FEB_352D);
    let m3 = c(b, 0x846C_A68B);
    let (s16, s15, s9) = (c(b, 16), c(b, 15), c(b, 9));
    let ki = b.mul(idx, &m1);
    let mut x = b.xor(keys, &ki);
    let sh = b.shr(&x, &s16);
    x = b.xor(&x, &sh);
    x = b.mul(&x, &m2);
    let sh = b.shr(&x, &s15);
    x = b.xor(&x, &sh);
    x = b.mul(&x, &m3);
    let sh = b.shr(&x, &s16);
    x = b.xor(&x, &sh);
    // 23 bits: (top + 0.5) / 2^23 is exact in f32 and strictly inside (0, 1). With 24 bits
    // the largest value rounds to 1.0, whose Gumbel noise is +inf (a uniformly random token).
    let top = b.shr(&x, &s9);
    let f = b.convert(&top, Elem::F32);
    let half = b.constant_f32(0.5, dims);
    let f = b.add(&f, &half);
    let scale = b.constant_f32(1.0 / 8_388_608.0, dims);
    b.mul(&f, &scale)
}

/// Carried values of the logits loop before its accumulators: counter, row count, hidden
/// states, LM head, logit rows, temperature, RNG keys, targets, top-k, top-p, min-p, token
/// mask, mask switch; int8 programs carry the LM head's scales after them.
const LOOP_INPUTS: usize = 13;

/// i32 words of a packed token mask.
pub fn mask_words(vocab: i64) -> i64 {
    (vocab + 31) / 32
}

/// Structured outputs: sets to -inf the logits of tokens the packed mask rows
/// `[start, start + rows)` do not allow, before logprobs and sampling see them (as vLLM
/// applies its grammar bitmask). Skipped at run time when no row is constrained.
fn apply_token_mask(b: &mut Block, logits: &V, mask: &V, on: &V, start: &V) -> V {
    let (r, vocab) = (logits.dims()[0], logits.dims()[1]);
    let words = mask.dims()[1];
    let zero = b.constant_int(0, &[], Elem::I32);
    let is_on = b.compare(Cmp::Gt, on, &zero);
    b.if_else(
        &is_on,
        |b| {
            let z = b.constant_int(0, &[], Elem::I32);
            let rows = b.dynamic_slice(mask, &[start, &z], &[r, words]);
            let wide = b.broadcast(&rows, &[r, words, 32], &[0, 1]);
            let shift = b.iota(&[r, words, 32], 2, Elem::I32);
            let shifted = b.shr(&wide, &shift);
            let one = b.constant_int(1, &[r, words, 32], Elem::I32);
            let bits = b.and(&shifted, &one);
            let bits = b.reshape(&bits, &[r, words * 32]);
            let bits = if words * 32 == vocab {
                bits
            } else {
                b.slice(&bits, &[0, 0], &[r, vocab])
            };
            let zeros = b.constant_int(0, &[r, vocab], Elem::I32);
            let allowed = b.compare(Cmp::Gt, &bits, &zeros);
            let ninf = b.constant_f32(f32::NEG_INFINITY, &[r, vocab]);
            vec![b.select(&allowed, logits, &ninf)]
        },
        |_| vec![logits.clone()],
    )
    .remove(0)
}

/// The per-row random-sampling filters of one chunk of logit rows.
struct Filters {
    top_k: V,
    top_p: V,
    min_p: V,
}

impl Filters {
    /// Sets to -inf what min-p, top-k and top-p exclude from temperature-scaled logits, in the
    /// host sampler's order (min-p, then top-k, then top-p renormalised over what is left).
    /// Skipped at run time when no row asks for a filter.
    fn apply(&self, b: &mut Block, scaled: &V, t: i64, vocab: i64) -> V {
        let zero_i = b.constant_int(0, &[t], Elem::I32);
        let one_f = b.constant_f32(1.0, &[t]);
        let zero_f = b.constant_f32(0.0, &[t]);
        let k_on = b.compare(Cmp::Gt, &self.top_k, &zero_i);
        let p_on = b.compare(Cmp::Lt, &self.top_p, &one_f);
        let m_on = b.compare(Cmp::Gt, &self.min_p, &zero_f);
        let on = b.binary("or", &k_on, &p_on);
        let on = b.binary("or", &on, &m_on);
        let any_on = any(b, &on);
        b.if_else(
            &any_on,
            |b| vec![self.filter(b, scaled, &k_on, &p_on, t, vocab)],
            |_| vec![scaled.clone()],
        )
        .remove(0)
    }

    fn filter(&self, b: &mut Block, scaled: &V, k_on: &V, p_on: &V, t: i64, vocab: i64) -> V {
        let tv = [t, vocab];
        let ninf = b.constant_f32(f32::NEG_INFINITY, &[]);
        let rowmax = b.reduce(scaled, &ninf, &[1], "maximum");
        // min-p: p >= min_p * p_max  <=>  s >= s_max + ln(min_p); ln(0) = -inf keeps all.
        let ln_minp = b.unary("log", &self.min_p);
        let thr_m = b.add(&rowmax, &ln_minp);
        let thr_m = b.broadcast(&thr_m, &tv, &[0]);
        let keep = b.compare(Cmp::Ge, scaled, &thr_m);
        let key = ordered_key(b, scaled);
        let min_key = b.constant_int(i32::MIN as i64, &[t], Elem::I32);

        // top-k: the k-th largest value; ties with it are kept, as on the host.
        let kth = bisect_threshold(b, &key, &[&self.top_k], |b, above, extra| {
            let n = count_rows(b, above);
            b.compare(Cmp::Ge, &n, &extra[0])
        });
        let thr_k = b.select(k_on, &kth, &min_key);
        let thr_k = b.broadcast(&thr_k, &tv, &[0]);
        let in_k = b.compare(Cmp::Ge, &key, &thr_k);
        let keep = b.and(&keep, &in_k);

        // top-p over the survivors: the largest threshold whose mass reaches p.
        let rowmax_b = b.broadcast(&rowmax, &tv, &[0]);
        let shifted = b.sub(scaled, &rowmax_b);
        let e = b.unary("exponential", &shifted);
        let zeros = b.constant_f32(0.0, &tv);
        let probs = b.select(&keep, &e, &zeros);
        let z = b.constant_f32(0.0, &[]);
        let total = b.reduce(&probs, &z, &[1], "add");
        let target = b.mul(&total, &self.top_p);
        let pth = bisect_threshold(b, &key, &[&probs, &target], |b, above, extra| {
            let zeros = b.constant_f32(0.0, extra[0].dims());
            let inside = b.select(above, &extra[0], &zeros);
            let z = b.constant_f32(0.0, &[]);
            let mass = b.reduce(&inside, &z, &[1], "add");
            b.compare(Cmp::Ge, &mass, &extra[1])
        });
        let thr_p = b.select(p_on, &pth, &min_key);
        let thr_p = b.broadcast(&thr_p, &tv, &[0]);
        let in_p = b.compare(Cmp::Ge, &key, &thr_p);
        let keep = b.and(&keep, &in_p);
        let ninf_tv = b.constant_f32(f32::NEG_INFINITY, &tv);
        b.select(&keep, scaled, &ninf_tv)
    }
}

/// An i32 image of f32 values with the same order (flip the magnitude bits of negatives), so
/// thresholds can be bisected exactly over integers.
fn ordered_key(b: &mut Block, x: &V) -> V {
    let dims = x.dims().to_vec();
    let bits = b.bitcast(x, Elem::I32);
    let s31 = b.constant_int(31, &dims, Elem::I32);
    let sign = b.shr_arith(&bits, &s31);
    let low = b.constant_int(i32::MAX as i64, &dims, Elem::I32);
    let mask = b.and(&sign, &low);
    b.xor(&bits, &mask)
}

/// Number of true entries in each row of a [T, V] predicate.
fn count_rows(b: &mut Block, pred: &V) -> V {
    let as_i = b.convert(pred, Elem::I32);
    let zero = b.constant_int(0, &[], Elem::I32);
    b.reduce(&as_i, &zero, &[1], "add")
}

/// Per row, the largest key `k` with `ok(key >= k)` true, by 32 bisection steps over i32 (the
/// predicate must be monotone: true for everything, false for nothing). `extra` values are
/// carried into the loop for `ok` to read.
fn bisect_threshold(
    b: &mut Block,
    key: &V,
    extra: &[&V],
    ok: impl FnOnce(&mut Block, &V, &[V]) -> V,
) -> V {
    let (t, vocab) = (key.dims()[0], key.dims()[1]);
    let zero = b.constant_int(0, &[], Elem::I32);
    let lo = b.constant_int(i32::MIN as i64, &[t], Elem::I32);
    let min_s = b.constant_int(i32::MIN as i64, &[], Elem::I32);
    let max_key = b.reduce(key, &min_s, &[1], "maximum");
    let one_t = b.constant_int(1, &[t], Elem::I32);
    let hi = b.add(&max_key, &one_t);
    let mut init: Vec<&V> = vec![&zero, &lo, &hi, key];
    init.extend_from_slice(extra);
    let outs = b.while_loop(
        &init,
        |c, v| {
            let n = c.constant_int(32, &[], Elem::I32);
            c.compare(Cmp::Lt, &v[0], &n)
        },
        |body, v| {
            let (lo, hi) = (&v[1], &v[2]);
            // floor((lo + hi) / 2) without overflow
            let one = body.constant_int(1, &[t], Elem::I32);
            let lo2 = body.shr_arith(lo, &one);
            let hi2 = body.shr_arith(hi, &one);
            let both = body.and(lo, hi);
            let odd = body.and(&both, &one);
            let mid = body.add(&lo2, &hi2);
            let mid = body.add(&mid, &odd);
            let mid_b = body.broadcast(&mid, &[t, vocab], &[0]);
            let above = body.compare(Cmp::Ge, &v[3], &mid_b);
            let good = ok(body, &above, &v[4..]);
            let new_lo = body.select(&good, &mid, lo);
            let new_hi = body.select(&good, hi, &mid);
            let one_s = body.constant_int(1, &[], Elem::I32);
            let mut next = vec![body.add(&v[0], &one_s), new_lo, new_hi];
            next.extend(v[3..].iter().cloned());
            next
        },
    );
    outs[1].clone()
}

/// `base` blocks doubled while `token_bytes` (a token's K and V over every query tile) × the
/// chunk's tokens stay within `budget` and the chunk divides the table.
fn grown_chunk(
    base: i64,
    block_size: i64,
    table_blocks: i64,
    token_bytes: i64,
    budget: i64,
) -> i64 {
    let mut k = base;
    while budget > 0
        && token_bytes * 2 * k * block_size <= budget
        && 2 * k * block_size <= MAX_GROWN_CHUNK_TOKENS
        && table_blocks % (2 * k) == 0
    {
        k *= 2;
    }
    k
}

/// The longest chunk a bucket's attention grows to. An iteration reads its whole chunk
/// of every row's pages whatever the rows' contexts are, so a few decode rows with short
/// contexts would read up to the table's end in one iteration (70B TP 8 deviceless
/// v6e:2x4, 16 rows at 512 tokens of context: 4,096-token chunks read twice the pages of
/// 2,048-token ones, +0.66 ms a step).
const MAX_GROWN_CHUNK_TOKENS: i64 = 2048;

#[cfg(test)]
mod tests {
    use super::{arg, arg_sharding, grown_chunk, split_sharding};

    #[test]
    fn shardings_split_one_axis() {
        assert_eq!(split_sharding(8, 1, 3), "{devices=[1,8,1]<=[8]}");
        assert_eq!(split_sharding(4, 0, 1), "{devices=[4]<=[4]}");
        assert_eq!(arg_sharding(arg::K_CACHE, 8), "{devices=[1,8,1,1]<=[8]}");
        assert_eq!(arg_sharding(arg::EMBED, 2), "{devices=[2,1]<=[2]}");
        assert_eq!(arg_sharding(arg::WK, 1), "{replicated}");
    }

    #[test]
    fn chunks_grow_for_few_tiles_within_the_budget_and_the_table() {
        // TPU defaults: 16-token blocks, 16-block chunks, 128 MiB, a 4,096-token table.
        // 70B at TP 8: a token's K and V of a layer are 512 bytes a chip.
        let at = |tiles: i64| grown_chunk(16, 16, 256, tiles * 512, 128 << 20);
        assert_eq!(at(1024), 16);
        assert_eq!(at(2048), 16, "never below the base chunk");
        assert_eq!(at(512), 32);
        assert_eq!(at(256), 64);
        assert_eq!(at(128), 128, "at most 2,048 tokens");
        assert_eq!(at(1), 128, "at most 2,048 tokens");
        // 8B at TP 1: 4 KiB a token.
        assert_eq!(grown_chunk(16, 16, 256, 128 * 4096, 128 << 20), 16);
        assert_eq!(grown_chunk(16, 16, 256, 32 * 4096, 128 << 20), 64);
        // Capped by the table: 1,024 tokens of context.
        assert_eq!(grown_chunk(16, 16, 64, 512, 128 << 20), 64);
        // A table of 48 blocks takes chunks that divide it: 16, not 32.
        assert_eq!(grown_chunk(16, 16, 48, 1, 1 << 20), 16);
        assert_eq!(grown_chunk(8, 16, 48, 1, 1 << 20), 16);
        // No budget: the base chunk.
        assert_eq!(grown_chunk(16, 16, 256, 1, 0), 16);
    }
}
