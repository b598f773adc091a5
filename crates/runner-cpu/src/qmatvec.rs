//! `x · Wᵀ` with W kept in the checkpoint's ggml block forms (Q4_0, Q4_1, Q8_0; the other
//! types below are laid out in the same panels, `QMatrix`): a decode step reads ~0.6 (Q4) or
//! ~1.06 (Q8) bytes per weight instead of 4 for an f32 copy. As llama.cpp
//! does, each activation row is first quantised per 32-block to int8 with an f32 scale `d` and
//! `s = d·Σq` (the term Q4's per-block offset multiplies), so a block's dot product is one
//! integer dot of 32 bytes:
//!
//! - Q4_1 (`w = dw·u + mw`, u in 0..16): `dw·dx·Σ u·q + mw·s`
//! - Q4_0 (`w = dw·(u − 8)`): the same with `mw = −8·dw`
//! - Q8_0 (`w = dw·q'`): `dw·dx·Σ q'·q`
//!
//! The blocks are repacked once at load into panels of 16 weight rows (same bytes per weight,
//! no f32 copy): per (panel, block), 4 bytes of each of the 16 rows side by side, so one
//! 64-byte vector holds `W[j0..j0+16, k..k+4]`. A row's 4 activation bytes broadcast against
//! it make one `vpdpbusd` (AVX-512 VNNI) or `vpmaddubsw`+`vpmaddwd` (AVX2) compute 16 (8)
//! outputs at once, and a block's scales convert to f32 16 at a time (`vcvtph2ps`). The
//! earlier layout (one row's blocks contiguous, a horizontal integer dot per block and row)
//! spent more instructions converting and scaling each block than on its 32 products; here
//! the scale work per block is a few vector ops per 16 outputs, and each unpacked weight
//! vector is reused by up to 8 activation rows. The integer sums are exact, and a lane's
//! float operations (one FMA per block, plus one for Q4's offset) are the same whatever the
//! tile size and batch, so a row's result does not depend on what it is batched with.

use rayon::prelude::*;
use std::mem::MaybeUninit;
use tpuserve_model::dequant::IQ4_VALUES;
use tpuserve_model::GgmlType;

/// Values per block, for every supported type.
pub use crate::actquant::QK;

/// Weight rows per panel (the f32 lanes of one AVX-512 vector).
const PJ: usize = 16;

/// Panels per parallel task when the rows fill more than one chunk (a prompt step).
const TASK_PANELS: usize = 4;

/// Panels per parallel task when the rows fit one chunk (a decode step): a 576-output matrix
/// in tasks of 4 panels is 9 tasks, 5 on one thread and 4 on the other; in 18 the o and down
/// projections of a 32-row SmolLM2 decode step took ~6 % less (phase timers, alternating
/// binaries), while the prompt step's 64-row chunks were ~2.5 % slower in smaller tasks.
const DECODE_TASK_PANELS: usize = 2;

/// Activation rows quantised and computed together; longer prefills run chunk after chunk
/// (the chunk's int8 rows stay in cache while the weights stream past them).
const ROW_CHUNK: usize = crate::actquant::CHUNK_ROWS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q8_0,
    /// ggml's Q4_K (super-blocks of 256: an f16 scale and min, 6-bit scales and mins per
    /// 32-value sub-block, 4-bit values), held as Q4_1's form: each sub-block's nibbles, its
    /// scale and min codes as bytes, the super-block's `d` and `−dmin` as f32 (the kernels
    /// multiply them into the exact f32 products `d·sc`, `−dmin·m`).
    Q4K,
    /// ggml's Q6_K (super-blocks of 256: an f16 scale, an 8-bit scale per 16 values, 6-bit
    /// values less 32), held as one byte a value (0..64) in Q8_0's order with each 32-value
    /// block's two half scale codes (i8) and the super-block's `d` (f32); the −32 comes off
    /// each half's integer sum (`QActs::half_offsets`).
    Q6K,
    /// ggml's Q5_0 (blocks of 32: an f16 scale, 5-bit values less 16): Q4_0's nibbles plus
    /// each value's fifth bit in 64 bytes beside them (`QMatrix`), the file's 22 bytes a block.
    Q5_0,
    /// ggml's Q5_1 (an f16 scale and offset, 5-bit values): as Q5_0, with Q4_1's offset.
    Q5_1,
    /// ggml's Q5_K (Q4_K's super-blocks with 5-bit values): Q4_K's form plus Q5_0's fifth
    /// bits.
    Q5K,
    /// ggml's Q3_K (super-blocks of 256: an f16 scale, a 6-bit scale per 16 values, 3-bit
    /// values less 4), held as nibbles in Q4's order with each 32-value block's two half
    /// scale codes (i8, less 32) and the super-block's `d` as Q6_K's; the −4 comes off each
    /// half's integer sum.
    Q3K,
    /// ggml's Q2_K (super-blocks of 256: an f16 scale and min, a 4-bit scale and min per 16
    /// values, 2-bit values), held as nibbles in Q4's order with each half's scale-and-min
    /// byte as stored and the super-block's `d` and `−dmin`; each half's min multiplies its
    /// activation sum.
    Q2K,
    /// ggml's IQ4_NL (blocks of 32: an f16 scale, 4-bit indices into sixteen fixed values),
    /// held as stored: the indices as Q4_0's nibbles, looked up in the kernels.
    IQ4NL,
    /// ggml's IQ4_XS (super-blocks of 256: an f16 scale, a 6-bit scale per 32 values, IQ4_NL's
    /// indices): the nibbles as IQ4_NL's, each block's scale code (i8, less 32) and the
    /// super-block's `d` as the K-quants'.
    IQ4XS,
}

// The kernels are generic over the weight type as a const parameter.
const T_Q4_0: u8 = 0;
const T_Q4_1: u8 = 1;
const T_Q8_0: u8 = 2;
const T_Q4_K: u8 = 3;
const T_Q6_K: u8 = 4;
const T_Q5_0: u8 = 5;
const T_Q5_1: u8 = 6;
const T_Q5_K: u8 = 7;
const T_Q3_K: u8 = 8;
const T_Q2_K: u8 = 9;
const T_IQ4_NL: u8 = 10;
const T_IQ4_XS: u8 = 11;

/// The types whose fifth bits follow their nibbles (`QMatrix`).
const fn five_bit(t: u8) -> bool {
    t == T_Q5_0 || t == T_Q5_1 || t == T_Q5_K
}

/// The types with super-block scales (`QMatrix::ks`, `kd`).
const fn k_scales(t: u8) -> bool {
    t == T_Q4_K || t == T_Q5_K || t == T_Q6_K || t == T_Q3_K || t == T_Q2_K || t == T_IQ4_XS
}

/// The types whose nibbles index [`IQ4_VALUES`].
const fn looked_up(t: u8) -> bool {
    t == T_IQ4_NL || t == T_IQ4_XS
}

/// The types whose blocks are `d · q` with signed values, no offset term (`a.s`).
const fn no_offset(t: u8) -> bool {
    t == T_Q8_0 || looked_up(t)
}

/// The types scaled per 16 values: their tiles keep an integer sum a row for each half of a
/// block.
const fn two_sums(t: u8) -> bool {
    t == T_Q6_K || t == T_Q3_K || t == T_Q2_K
}

/// What each stored (unsigned) value carries above the value it stands for, taken off each
/// half's integer sum through the activations' half sums.
const fn value_offset(t: u8) -> i32 {
    if t == T_Q6_K {
        32
    } else if t == T_Q3_K {
        4
    } else {
        0
    }
}

/// The types whose scale codes are signed bytes.
const fn signed_codes(t: u8) -> bool {
    t == T_Q6_K || t == T_Q3_K || t == T_IQ4_XS
}

/// The values IQ4_NL / IQ4_XS indices stand for, plus 128 (1..=241: unsigned bytes, as
/// `vpdpbusd` takes its weights; `QActs::c` takes the 128 off again, as for Q8_0).
const IQ4_UNSIGNED: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (IQ4_VALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

/// Bytes of one panel's quantised values for one block (16 rows × 32 values).
const fn panel_block_bytes(t: u8) -> usize {
    if t == T_Q8_0 || t == T_Q6_K {
        PJ * QK
    } else if five_bit(t) {
        PJ * QK / 2 + PJ * QK / 8
    } else {
        PJ * QK / 2
    }
}

impl QType {
    /// The ggml types these kernels compute on; others are dequantised at load.
    pub fn from_ggml(t: GgmlType) -> Option<QType> {
        match t {
            GgmlType::Q4_0 => Some(QType::Q4_0),
            GgmlType::Q4_1 => Some(QType::Q4_1),
            GgmlType::Q8_0 => Some(QType::Q8_0),
            GgmlType::Q4K => Some(QType::Q4K),
            GgmlType::Q6K => Some(QType::Q6K),
            GgmlType::Q5_0 => Some(QType::Q5_0),
            GgmlType::Q5_1 => Some(QType::Q5_1),
            GgmlType::Q5K => Some(QType::Q5K),
            GgmlType::Q3K => Some(QType::Q3K),
            GgmlType::Q2K => Some(QType::Q2K),
            GgmlType::IQ4NL => Some(QType::IQ4NL),
            GgmlType::IQ4XS => Some(QType::IQ4XS),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        match self {
            QType::Q4_0 => T_Q4_0,
            QType::Q4_1 => T_Q4_1,
            QType::Q8_0 => T_Q8_0,
            QType::Q4K => T_Q4_K,
            QType::Q6K => T_Q6_K,
            QType::Q5_0 => T_Q5_0,
            QType::Q5_1 => T_Q5_1,
            QType::Q5K => T_Q5_K,
            QType::Q3K => T_Q3_K,
            QType::Q2K => T_Q2_K,
            QType::IQ4NL => T_IQ4_NL,
            QType::IQ4XS => T_IQ4_XS,
        }
    }

    /// The ggml type (`from_ggml`'s inverse).
    pub fn ggml(self) -> GgmlType {
        match self {
            QType::Q4_0 => GgmlType::Q4_0,
            QType::Q4_1 => GgmlType::Q4_1,
            QType::Q8_0 => GgmlType::Q8_0,
            QType::Q4K => GgmlType::Q4K,
            QType::Q6K => GgmlType::Q6K,
            QType::Q5_0 => GgmlType::Q5_0,
            QType::Q5_1 => GgmlType::Q5_1,
            QType::Q5K => GgmlType::Q5K,
            QType::Q3K => GgmlType::Q3K,
            QType::Q2K => GgmlType::Q2K,
            QType::IQ4NL => GgmlType::IQ4NL,
            QType::IQ4XS => GgmlType::IQ4XS,
        }
    }

    /// Bytes of one ggml block (the model crate's table).
    pub fn block_bytes(self) -> usize {
        self.ggml().block().1
    }

    /// Values in one ggml block.
    pub fn block_values(self) -> usize {
        self.ggml().block().0
    }
}

/// A weight matrix `[rows (out), cols (in)]` in 16-row panels (rows padded with zero blocks
/// to a whole panel). Per (panel p, block b), at index `pb = p·blocks + b`:
/// - `qs[pb·bytes ..]`: chunk `c` (64 bytes) holds, for each panel row `jl`, 4 bytes at
///   `c·64 + jl·4`. Q4: ggml's block bytes `4c..4c+4` (low nibbles: values `4c..4c+4`, high
///   nibbles: values `16+4c..`), c in 0..4. Q8_0: values `4c..4c+4`, c in 0..8.
/// - Q5_0 / Q5_1: the nibbles as Q4's (chunks 0..4), then 64 bytes of fifth bits laid over
///   the chunks: byte `256 + jl·4 + i` holds, in bit `2c` (`2c + 1`), the fifth bit of the
///   value in the low (high) nibble of chunk `c`'s byte `jl·4 + i` (one bit a value, as the
///   file's `qh`). Each of a block's eight nibble vectors finds its bits in one bit of the
///   same 64 bytes, loaded once: a shift and a mask put them at 16 (AVX2), a test makes them
///   a byte mask (AVX-512). As a u64 mask per vector, AVX2 spent ~8 operations a vector
///   spreading 32 bits over 32 bytes (its Q5 tiles at ~60 % of Q4_1's rate, now ~78 %).
/// - `d[pb·16 + jl]`, `m[..]` (Q4_1, Q5_1): the f16 scale and offset bits as stored.
/// - Q4_K: each 32-value sub-block as a Q4_1 block (its values' nibbles in Q4_1's order);
///   `ks[pb·32 + jl]` its 6-bit scale code, `ks[pb·32 + 16 + jl]` its min code;
///   `kd[(pb / 8)·32 + jl]` the super-block's `d`, `kd[.. + 16 + jl]` its `−dmin` (f32: the
///   kernels' `d·sc` needs up to 17 significant bits, exact in f32, not in f16).
/// - Q5_K: Q4_K's nibbles, codes and super-block scales, with each value's fifth bit in the
///   64 bytes after the nibbles as Q5_0's.
/// - Q6_K: each 32-value block's values (0..64, one byte each) in Q8_0's order; the scale
///   codes (i8) of its first and second 16 values at `ks[pb·32 + jl]`, `ks[.. + 16 + jl]`;
///   the super-block's `d` at both `kd[(pb / 8)·32 + jl]` and `kd[.. + 16 + jl]`.
/// - Q3_K: each 32-value block's values (0..8) as nibbles in Q4's order (the low nibbles are
///   its first 16 values, the high its second); codes and `d` as Q6_K's (codes less 32).
/// - Q2_K: values (0..4) as Q3_K's; `ks[pb·32 + jl]`, `ks[.. + 16 + jl]` each half's byte as
///   stored (scale code in the low nibble, min code in the high); `kd[(pb / 8)·32 + jl]` the
///   super-block's `d`, `kd[.. + 16 + jl]` its `−dmin`.
/// - IQ4_NL: the indices as Q4_0's nibbles. IQ4_XS: the same, each block's scale code (i8,
///   less 32) at `ks[pb·32 + jl]`, the super-block's `d` at `kd[(pb / 8)·32 + jl]`.
pub struct QMatrix {
    pub ty: QType,
    pub rows: usize,
    pub cols: usize,
    blocks: usize,
    panels: usize,
    qs: Lines,
    d: Vec<u16>,
    m: Vec<u16>,
    ks: Vec<u8>,
    kd: Vec<f32>,
}

/// One cache line of panel bytes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// Panel bytes in 64-byte aligned lines, so that each 64-byte weight vector a kernel loads is
/// one cache line: a `Vec<u8>` starts wherever the allocator puts it (16-byte aligned), and
/// off a 64-byte boundary every vector load straddled two lines, at a cost that moved with
/// each build's heap layout (`qbench`: the same kernel code 39.5 or 42 ms).
struct Lines(Vec<Line>);

impl Lines {
    /// `bytes` (a multiple of 64) zeros.
    fn zeroed(bytes: usize) -> Self {
        assert!(bytes.is_multiple_of(64), "panel bytes come in lines");
        Lines(vec![Line([0; 64]); bytes / 64])
    }

    fn from_bytes(b: &[u8]) -> Self {
        let mut l = Lines::zeroed(b.len());
        l.copy_from_slice(b);
        l
    }
}

impl std::ops::Deref for Lines {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes (`repr(C)`, no padding); the lines are contiguous.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 64) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `deref`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u8, self.0.len() * 64) }
    }
}

fn f16(bits: u16) -> f32 {
    half::f16::from_bits(bits).to_f32()
}

fn le16(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

impl QMatrix {
    /// Repacks `data`, `rows × cols / 32` ggml blocks of `ty` (row after row), into panels.
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self, String> {
        let bv = ty.block_values();
        if !cols.is_multiple_of(bv) {
            return Err(format!("{ty:?} rows of {cols} values are not whole blocks"));
        }
        let bb = ty.block_bytes();
        if data.len() != rows * cols / bv * bb {
            return Err(format!(
                "{ty:?} [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols / bv * bb,
                data.len()
            ));
        }
        let blocks = cols / QK;
        let panels = rows.div_ceil(PJ);
        let pbb = panel_block_bytes(ty.code());
        let n = panels * blocks;
        // Each type's scale arrays: f16 bits as stored, or the K-quants' codes and super-block
        // scales.
        let kquant = k_scales(ty.code());
        let len = |on: bool| if on { n * PJ } else { 0 };
        let mut w = QMatrix {
            ty,
            rows,
            cols,
            blocks,
            panels,
            qs: Lines::zeroed(n * pbb),
            d: vec![0u16; len(!kquant)],
            m: vec![0u16; len(matches!(ty, QType::Q4_1 | QType::Q5_1))],
            ks: vec![0u8; 2 * len(kquant)],
            kd: vec![0f32; 2 * len(kquant) / 8],
        };
        if kquant {
            match ty {
                QType::Q6K => w.fill_q6_k(&data),
                QType::Q3K | QType::Q2K => w.fill_k_small(&data),
                QType::IQ4XS => w.fill_iq4_xs(&data),
                _ => w.fill_k_nibbles(&data),
            }
            return Ok(w);
        }
        for j in 0..rows {
            let (p, jl) = (j / PJ, j % PJ);
            for b in 0..blocks {
                let blk = &data[(j * blocks + b) * bb..(j * blocks + b + 1) * bb];
                let pb = p * blocks + b;
                w.d[pb * PJ + jl] = le16(blk, 0);
                let dst = &mut w.qs[pb * pbb..(pb + 1) * pbb];
                let (vals, qh) = match ty {
                    QType::Q4_1 => {
                        w.m[pb * PJ + jl] = le16(blk, 2);
                        (&blk[4..20], None)
                    }
                    QType::Q4_0 | QType::IQ4NL => (&blk[2..18], None),
                    QType::Q8_0 => (&blk[2..34], None),
                    QType::Q5_0 => (&blk[6..22], Some(&blk[2..6])),
                    QType::Q5_1 => {
                        w.m[pb * PJ + jl] = le16(blk, 2);
                        (&blk[8..24], Some(&blk[4..8]))
                    }
                    QType::Q4K
                    | QType::Q5K
                    | QType::Q6K
                    | QType::Q3K
                    | QType::Q2K
                    | QType::IQ4XS => unreachable!("repacked by the fill_* of its type"),
                };
                if let Some(qh) = qh {
                    // Value k: the low (k < 16) or high nibble of byte k % 16, fifth bit k of qh.
                    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                    let five: [u8; QK] = std::array::from_fn(|k| {
                        let n = if k < 16 {
                            vals[k] & 0x0f
                        } else {
                            vals[k - 16] >> 4
                        };
                        n | ((((qh >> k) & 1) as u8) << 4)
                    });
                    put_nibbles(dst, jl, &five);
                    continue;
                }
                for (c, four) in vals.chunks_exact(4).enumerate() {
                    dst[c * 64 + jl * 4..c * 64 + jl * 4 + 4].copy_from_slice(four);
                }
            }
        }
        Ok(w)
    }

    /// Q4_K / Q5_K super-blocks (row after row) into the panels: sub-block `t` of super-block
    /// `s` is block `8s + t`, its 32 values (Q4_K: the low or the high halves of 32 bytes;
    /// Q5_K: `dequant::q5_k_values`) laid out as a Q4_1 / Q5_1 block's.
    fn fill_k_nibbles(&mut self, data: &[u8]) {
        let (blocks, pbb) = (self.blocks, panel_block_bytes(self.ty.code()));
        for (i, sb) in data.chunks_exact(self.ty.block_bytes()).enumerate() {
            let (j, s) = (i / (blocks / 8), i % (blocks / 8));
            let (p, jl) = (j / PJ, j % PJ);
            let (d, dmin) = (f16(le16(sb, 0)), f16(le16(sb, 2)));
            let vals: [u8; 256] = if self.ty == QType::Q5K {
                tpuserve_model::dequant::q5_k_values(sb)
            } else {
                let qs = &sb[16..144];
                std::array::from_fn(|k| {
                    let (t, l) = (k / 32, k % 32);
                    let byte = qs[(t / 2) * 32 + l];
                    if t % 2 == 0 {
                        byte & 0x0f
                    } else {
                        byte >> 4
                    }
                })
            };
            for t in 0..8 {
                let (sc, m) = tpuserve_model::dequant::scale_min_k4(t, &sb[4..16]);
                let pb = p * blocks + 8 * s + t;
                self.ks[pb * 2 * PJ + jl] = sc;
                self.ks[pb * 2 * PJ + PJ + jl] = m;
                self.kd[pb / 8 * 2 * PJ + jl] = d;
                self.kd[pb / 8 * 2 * PJ + PJ + jl] = -dmin;
                let block: &[u8; QK] = vals[32 * t..32 * t + 32].try_into().unwrap();
                put_nibbles(&mut self.qs[pb * pbb..(pb + 1) * pbb], jl, block);
            }
        }
    }

    /// Q6_K super-blocks (row after row) into the panels: block `8s + t` of a row holds
    /// values `32t .. 32t + 32` of its super-block `s` (`dequant::q6_k_values`).
    fn fill_q6_k(&mut self, data: &[u8]) {
        let (blocks, pbb) = (self.blocks, panel_block_bytes(T_Q6_K));
        for (i, sb) in data.chunks_exact(QType::Q6K.block_bytes()).enumerate() {
            let (j, s) = (i / (blocks / 8), i % (blocks / 8));
            let (p, jl) = (j / PJ, j % PJ);
            let (q, sc) = (tpuserve_model::dequant::q6_k_values(sb), &sb[192..208]);
            let d = f16(le16(sb, 208));
            for t in 0..8 {
                let pb = p * blocks + 8 * s + t;
                self.ks[pb * 2 * PJ + jl] = sc[2 * t];
                self.ks[pb * 2 * PJ + PJ + jl] = sc[2 * t + 1];
                self.kd[pb / 8 * 2 * PJ + jl] = d;
                self.kd[pb / 8 * 2 * PJ + PJ + jl] = d;
                let dst = &mut self.qs[pb * pbb..(pb + 1) * pbb];
                for (c, four) in q[32 * t..32 * t + 32].chunks_exact(4).enumerate() {
                    dst[c * 64 + jl * 4..c * 64 + jl * 4 + 4].copy_from_slice(four);
                }
            }
        }
    }

    /// Q2_K / Q3_K super-blocks (row after row) into the panels: block `8s + t` of a row
    /// holds values `32t .. 32t + 32` of its super-block `s` (`dequant::q2_k_values`,
    /// `q3_k_values`) as nibbles, its halves' codes those of 16-value groups `2t`, `2t + 1`.
    fn fill_k_small(&mut self, data: &[u8]) {
        use tpuserve_model::dequant;
        let (blocks, pbb) = (self.blocks, panel_block_bytes(self.ty.code()));
        for (i, sb) in data.chunks_exact(self.ty.block_bytes()).enumerate() {
            let (j, s) = (i / (blocks / 8), i % (blocks / 8));
            let (p, jl) = (j / PJ, j % PJ);
            let (vals, codes, d, d2): ([u8; 256], [u8; 16], f32, f32) = if self.ty == QType::Q3K {
                let d = f16(le16(sb, 108));
                let sc = dequant::q3_k_scales(sb);
                (dequant::q3_k_values(sb), sc.map(|c| c as i8 as u8), d, d)
            } else {
                let (d, dmin) = (f16(le16(sb, 80)), f16(le16(sb, 82)));
                let codes: [u8; 16] = sb[..16].try_into().unwrap();
                (dequant::q2_k_values(sb), codes, d, -dmin)
            };
            for t in 0..8 {
                let pb = p * blocks + 8 * s + t;
                self.ks[pb * 2 * PJ + jl] = codes[2 * t];
                self.ks[pb * 2 * PJ + PJ + jl] = codes[2 * t + 1];
                self.kd[pb / 8 * 2 * PJ + jl] = d;
                self.kd[pb / 8 * 2 * PJ + PJ + jl] = d2;
                let block: &[u8; QK] = vals[32 * t..32 * t + 32].try_into().unwrap();
                put_nibbles(&mut self.qs[pb * pbb..(pb + 1) * pbb], jl, block);
            }
        }
    }

    /// IQ4_XS super-blocks (row after row) into the panels: block `8s + t` of a row holds
    /// sub-block `t` of its super-block `s`, its 16 bytes of indices as stored.
    fn fill_iq4_xs(&mut self, data: &[u8]) {
        let (blocks, pbb) = (self.blocks, panel_block_bytes(T_IQ4_XS));
        for (i, sb) in data.chunks_exact(QType::IQ4XS.block_bytes()).enumerate() {
            let (j, s) = (i / (blocks / 8), i % (blocks / 8));
            let (p, jl) = (j / PJ, j % PJ);
            let d = f16(le16(sb, 0));
            for (t, code) in tpuserve_model::dequant::iq4_xs_scales(sb)
                .into_iter()
                .enumerate()
            {
                let pb = p * blocks + 8 * s + t;
                self.ks[pb * 2 * PJ + jl] = code as u8;
                self.kd[pb / 8 * 2 * PJ + jl] = d;
                let dst = &mut self.qs[pb * pbb..(pb + 1) * pbb];
                let q = &sb[8 + 16 * t..24 + 16 * t];
                for (c, four) in q.chunks_exact(4).enumerate() {
                    dst[c * 64 + jl * 4..c * 64 + jl * 4 + 4].copy_from_slice(four);
                }
            }
        }
    }

    /// Row `r`'s block scale and offset (Q4_0: `−8·d`; Q8_0, IQ4: none; Q6_K, Q3_K, Q2_K: its
    /// two halves' scales).
    fn scales(&self, pb: usize, jl: usize) -> (f32, f32) {
        let i = pb * PJ + jl;
        match self.ty {
            QType::IQ4XS => {
                let (k, kd) = (pb * 2 * PJ + jl, pb / 8 * 2 * PJ + jl);
                (self.ks[k] as i8 as f32 * self.kd[kd], 0.0)
            }
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q3K | QType::Q2K => {
                let (k, kd) = (pb * 2 * PJ + jl, pb / 8 * 2 * PJ + jl);
                let code = |b: u8| match self.ty {
                    QType::Q6K | QType::Q3K => b as i8 as f32,
                    QType::Q2K => (b & 0x0f) as f32,
                    _ => b as f32,
                };
                // Q2_K: both halves' scales multiply `d` (its `−dmin` goes with the mins).
                let kd2 = if self.ty == QType::Q2K { kd } else { kd + PJ };
                (
                    code(self.ks[k]) * self.kd[kd],
                    code(self.ks[k + PJ]) * self.kd[kd2],
                )
            }
            QType::Q4_1 | QType::Q5_1 => (f16(self.d[i]), f16(self.m[i])),
            QType::Q4_0 => (f16(self.d[i]), -8.0 * f16(self.d[i])),
            QType::Q5_0 => (f16(self.d[i]), -16.0 * f16(self.d[i])),
            QType::Q8_0 | QType::IQ4NL => (f16(self.d[i]), 0.0),
        }
    }

    /// Q2_K: row `r`'s two halves' offsets `−dmin·m` in block `pb`.
    fn mins(&self, pb: usize, jl: usize) -> (f32, f32) {
        let (k, kd) = (pb * 2 * PJ + jl, pb / 8 * 2 * PJ + PJ + jl);
        (
            (self.ks[k] >> 4) as f32 * self.kd[kd],
            (self.ks[k + PJ] >> 4) as f32 * self.kd[kd],
        )
    }

    /// Row `r` dequantised into `out` (embedding lookups).
    pub fn dequant_row(&self, r: usize, out: &mut [f32]) {
        let (p, jl) = (r / PJ, r % PJ);
        let pbb = panel_block_bytes(self.ty.code());
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let pb = p * self.blocks + b;
            let q = &self.qs[pb * pbb..(pb + 1) * pbb];
            let (d, m) = self.scales(pb, jl);
            match self.ty {
                QType::Q4_0 | QType::Q4_1 | QType::Q4K | QType::Q5_0 | QType::Q5_1 | QType::Q5K => {
                    for (k, o) in o.iter_mut().enumerate() {
                        *o = nibble_value(self.ty.code(), q, jl, k) as f32 * d + m;
                    }
                }
                QType::Q8_0 => {
                    for (k, o) in o.iter_mut().enumerate() {
                        *o = (q[(k / 4) * 64 + jl * 4 + k % 4] as i8) as f32 * d;
                    }
                }
                QType::Q6K => {
                    for (k, o) in o.iter_mut().enumerate() {
                        let v = q[(k / 4) * 64 + jl * 4 + k % 4] as i32 - 32;
                        *o = if k < 16 { d } else { m } * v as f32;
                    }
                }
                QType::Q3K => {
                    for (k, o) in o.iter_mut().enumerate() {
                        let v = nibble_value(T_Q3_K, q, jl, k) as i32 - 4;
                        *o = if k < 16 { d } else { m } * v as f32;
                    }
                }
                QType::IQ4NL | QType::IQ4XS => {
                    for (k, o) in o.iter_mut().enumerate() {
                        let v = IQ4_VALUES[nibble_value(T_IQ4_NL, q, jl, k) as usize];
                        *o = d * v as f32;
                    }
                }
                QType::Q2K => {
                    let (n0, n1) = self.mins(pb, jl);
                    for (k, o) in o.iter_mut().enumerate() {
                        let v = nibble_value(T_Q2_K, q, jl, k) as f32;
                        *o = if k < 16 { d * v + n0 } else { m * v + n1 };
                    }
                }
            }
        }
    }

    /// Bytes held (weights and scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 2 * (self.d.len() + self.m.len()) + self.ks.len() + 4 * self.kd.len()
    }
}

pub use crate::actquant::{quantize_acts, quantize_rms_norm, quantize_swiglu, QActs};

/// Which kernel runs; tests call each one the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QIsa {
    Avx512Vnni,
    Avx2,
    Portable,
}

/// Every kernel this CPU can run, best first.
pub fn available_isas() -> Vec<QIsa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512vnni")
            && has!("fma")
            && has!("f16c")
        {
            v.push(QIsa::Avx512Vnni);
        }
        if has!("avx2") && has!("fma") && has!("f16c") {
            v.push(QIsa::Avx2);
        }
    }
    v.push(QIsa::Portable);
    v
}

fn best_isa() -> QIsa {
    static BEST: std::sync::OnceLock<QIsa> = std::sync::OnceLock::new();
    *BEST.get_or_init(|| available_isas()[0])
}

/// Activation rows `start .. end` a panel call computes.
type Rows = (usize, usize);

/// Where results go: row `r`, output `j` at `y[(r − row0) · stride + j − col0]` (a whole
/// result from 0, 0, or one task's tile of it). Shared by the parallel tasks of one matmul
/// (here and in `bf16dot`), each of which writes its own rows and columns.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    pub(crate) y: *mut f32,
    pub(crate) stride: usize,
    pub(crate) row0: usize,
    pub(crate) col0: usize,
}

// SAFETY: tasks write disjoint blocks (their own rows × columns) of the shared buffer.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// A whole `[rows, stride]` result at `y`.
    pub(crate) fn whole(y: *mut f32, stride: usize) -> Out {
        Out {
            y,
            stride,
            row0: 0,
            col0: 0,
        }
    }

    /// Where row `r`'s output `j` goes.
    ///
    /// # Safety
    /// `r ≥ row0`, `j ≥ col0`, and the place lies inside the buffer.
    unsafe fn at(&self, r: usize, j: usize) -> *mut f32 {
        self.y.add((r - self.row0) * self.stride + j - self.col0)
    }
}

/// Portable: one (row, weight row) pair at a time over the panel layout, exact integer
/// block dots, then the block's scale and offset terms.
fn panel_portable<const T: u8>(a: &QActs, rs: Rows, w: &QMatrix, p: usize, out: Out) {
    let (nb, pbb) = (a.blocks, panel_block_bytes(T));
    let valid = (w.rows - p * PJ).min(PJ);
    for r in rs.0..rs.1 {
        for jl in 0..valid {
            let mut acc = 0f32;
            for b in 0..nb {
                let pb = p * nb + b;
                let q = &w.qs[pb * pbb..(pb + 1) * pbb];
                let xq = a.block_q(r, b);
                let (dw, mw) = w.scales(pb, jl);
                let i = a.at(r, b);
                if two_sums(T) {
                    // Each half's integer sum, then its scale (Q2_K: and its min times the
                    // half's activation sum).
                    let (mut sums, mut xs) = ([0i32; 2], [0i32; 2]);
                    for k in 0..QK {
                        let v = if T == T_Q6_K {
                            q[(k / 4) * 64 + jl * 4 + k % 4] as i32
                        } else {
                            nibble_value(T, q, jl, k) as i32
                        };
                        sums[k / 16] += (v - value_offset(T)) * xq[k] as i32;
                        xs[k / 16] += xq[k] as i32;
                    }
                    acc += (dw * a.d[i]) * sums[0] as f32;
                    acc += (mw * a.d[i]) * sums[1] as f32;
                    if T == T_Q2_K {
                        let (n0, n1) = w.mins(pb, jl);
                        acc += n0 * (a.d[i] * xs[0] as f32);
                        acc += n1 * (a.d[i] * xs[1] as f32);
                    }
                    continue;
                }
                let mut isum = 0i32;
                for k in 0..QK {
                    let wv = if T == T_Q8_0 {
                        (q[(k / 4) * 64 + jl * 4 + k % 4] as i8) as i32
                    } else if looked_up(T) {
                        IQ4_VALUES[nibble_value(T, q, jl, k) as usize] as i32
                    } else {
                        nibble_value(T, q, jl, k) as i32
                    };
                    isum += wv * xq[k] as i32;
                }
                acc += (dw * a.d[i]) * isum as f32;
                if !no_offset(T) {
                    acc += mw * a.s[i];
                }
            }
            // SAFETY: row r < a.rows and column p·16 + jl < w.rows of the output.
            unsafe { *out.at(r, p * PJ + jl) = acc };
        }
    }
}

/// Writes panel row `jl`'s 32 unsigned values (0..16, or 0..32 for the five-bit types, whose
/// `dst` holds the masks after the nibbles) into one block's panel bytes `dst`.
fn put_nibbles(dst: &mut [u8], jl: usize, vals: &[u8; QK]) {
    for c in 0..4 {
        for i in 0..4 {
            let k = 4 * c + i;
            dst[c * 64 + jl * 4 + i] = (vals[k] & 0x0f) | ((vals[16 + k] & 0x0f) << 4);
        }
    }
    if dst.len() > 256 {
        for i in 0..4 {
            dst[256 + jl * 4 + i] = (0..4)
                .map(|c| {
                    let k = 4 * c + i;
                    (((vals[k] >> 4) & 1) << (2 * c)) | (((vals[16 + k] >> 4) & 1) << (2 * c + 1))
                })
                .fold(0, |a, b| a | b);
        }
    }
}

/// Value `k` (unsigned: 0..16, Q5: 0..32; IQ4: the index) of panel row `jl` in one block's
/// bytes `q` of a nibble type (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q3_K, Q2_K, IQ4_NL, IQ4_XS).
fn nibble_value(t: u8, q: &[u8], jl: usize, k: usize) -> u8 {
    let (c, i) = ((k % 16) / 4, k % 4);
    let byte = q[c * 64 + jl * 4 + i];
    let v = if k < 16 { byte & 0x0f } else { byte >> 4 };
    if !five_bit(t) {
        return v;
    }
    let bit = 2 * c + usize::from(k >= 16);
    v | (((q[256 + jl * 4 + i] >> bit) & 1) << 4)
}

/// How far ahead, in blocks of the panel stream, a panel's first tile prefetches (8 was
/// fastest of 4 / 8 / 16 / 32 on a 32-row decode step).
#[cfg(target_arch = "x86_64")]
const PF_BLOCKS: usize = 8;

/// Asks for the weights (and their scales) `PF_BLOCKS` blocks past panel block `pb`, into the
/// next panel near its end. A decode step reads every weight once, from DRAM, and its tiles
/// waited on each line: the hardware prefetchers did not run far enough ahead (a 32-row
/// SmolLM2 decode step 25.5 → 23.2 ms, a 1-row one 4.0 → 2.7 ms). Prefetches do not fault, so
/// past the matrix's end they are harmless.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_ahead<const T: u8>(w: &QMatrix, pb: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let pbb = panel_block_bytes(T);
    let at = (pb + PF_BLOCKS) * pbb;
    let qs = w.qs.as_ptr().wrapping_add(at) as *const i8;
    // SAFETY: a prefetch is a hint; it reads nothing and never faults, in bounds or not.
    unsafe {
        for l in (0..pbb).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(qs.wrapping_add(l));
        }
        let at = (pb + PF_BLOCKS) * PJ;
        if k_scales(T) {
            // Two blocks' codes a line; a super-block's scales in two lines.
            let kd = w.kd.as_ptr().wrapping_add((pb + PF_BLOCKS) / 8 * 2 * PJ) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(w.ks.as_ptr().wrapping_add(2 * at) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(kd);
            _mm_prefetch::<_MM_HINT_T0>(kd.wrapping_add(64));
        } else {
            _mm_prefetch::<_MM_HINT_T0>(w.d.as_ptr().wrapping_add(at) as *const i8);
        }
        if T == T_Q4_1 || T == T_Q5_1 {
            _mm_prefetch::<_MM_HINT_T0>(w.m.as_ptr().wrapping_add(at) as *const i8);
        }
    }
}

/// The 4 activation bytes of the tile's row `r` (from a block's first row `x`, see
/// `QActs::at`), starting at value `k`, as one i32.
///
/// # Safety
/// `x` points at a block of a chunk's rows and row `r` of it exists.
#[inline(always)]
unsafe fn x4(x: *const u8, r: usize, k: usize) -> i32 {
    std::ptr::read_unaligned(x.add(r * QK + k) as *const i32)
}

/// `$f(0); $f(1); ...`: a block's 4 (Q4) or 8 (Q8_0) weight chunks written out one after
/// another. As a `for` loop LLVM kept them a loop, and the unrolled tile lets it schedule
/// across chunks (qbench, 64 rows, one thread, VNNI: 44.0 → 40.7 ms).
#[cfg(target_arch = "x86_64")]
macro_rules! unroll {
    ($f:ident: $($c:literal)*) => {
        $($f($c);)*
    };
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{
        five_bit, k_scales, looked_up, no_offset, panel_block_bytes, prefetch_ahead, signed_codes,
        two_sums, value_offset, x4, Out, QActs, QMatrix, Rows, IQ4_UNSIGNED, PJ, QK, T_Q2_K,
        T_Q4_1, T_Q5_0, T_Q5_1, T_Q6_K, T_Q8_0,
    };
    use std::arch::x86_64::*;

    /// `R` activation rows from `r0` × panel `p`: per block, 8 `vpdpbusd` per row into an
    /// integer sum per (row, weight row), then one FMA with the block's scales (and one more
    /// for Q4's offset).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn tile<const T: u8, const R: usize>(
        a: &QActs,
        r0: usize,
        w: &QMatrix,
        p: usize,
        out: Out,
        prefetch: bool,
    ) {
        let nb = a.blocks;
        let pbb = panel_block_bytes(T);
        // The tile's rows share a chunk (`panel` asserts its rows are one), so each row's
        // bytes and scales lie at fixed offsets from its block's first row.
        let (j0, step) = a.row_start(r0);
        let mask = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); R];
        // Q2_K's first-half activation sums and the other half-scaled types' starting sums
        // (empty for the others, which never read them).
        let halves: &[i32] = if T == T_Q2_K { a.half_sums() } else { &[] };
        let offsets: &[i32] = if value_offset(T) != 0 {
            a.half_offsets(value_offset(T))
        } else {
            &[]
        };
        for b in 0..nb {
            let pb = p * nb + b;
            let j = j0 + b * step;
            let xb = a.q.as_ptr().add(j * QK) as *const u8;
            let wp = w.qs.as_ptr().add(pb * pbb);
            if prefetch {
                prefetch_ahead::<T>(w, pb);
            }
            let mut isum = [_mm512_setzero_si512(); R];
            // Types scaled per half: the second half's sums (the first half's in `isum`).
            let mut isum2 = [_mm512_setzero_si512(); R];
            if value_offset(T) != 0 {
                // Each half's sum starts at −offset·Σx over the half (`half_offsets`), so
                // it ends as the sum over the values.
                for r in 0..R {
                    isum[r] = _mm512_set1_epi32(*offsets.get_unchecked(2 * (j + r)));
                    isum2[r] = _mm512_set1_epi32(*offsets.get_unchecked(2 * (j + r) + 1));
                }
            }
            if T == T_Q6_K {
                // The values (0..64) are already unsigned bytes.
                let mut eighth = |c: usize| {
                    let wv = _mm512_loadu_si512(wp.add(c * 64) as *const __m512i);
                    let sums = if c < 4 { &mut isum } else { &mut isum2 };
                    for (r, s) in sums.iter_mut().enumerate() {
                        let xv = _mm512_set1_epi32(x4(xb, r, 4 * c));
                        *s = _mm512_dpbusd_epi32(*s, wv, xv);
                    }
                };
                unroll!(eighth: 0 1 2 3 4 5 6 7);
            } else if T == T_Q8_0 {
                // `vpdpbusd` multiplies unsigned bytes (its register operand) by signed ones
                // (the operand that may be a broadcast from memory): the weights, flipped to
                // `w + 128`, go unsigned, so each row's activations stay a folded broadcast
                // (unsigned activations needed a `vpbroadcastd` of their own per product, and
                // the LM head ran at two thirds of Q4_1's rate); each sum starts at
                // `c = −128·Σx` (a broadcast load, where a subtraction after the products
                // took a vector operation a row), so the integer sums are the same.
                for (r, s) in isum.iter_mut().enumerate() {
                    *s = _mm512_set1_epi32(*a.c.get_unchecked(j + r));
                }
                let flip = _mm512_set1_epi8(-128);
                let mut eighth = |c: usize| {
                    let wv = _mm512_xor_si512(
                        _mm512_loadu_si512(wp.add(c * 64) as *const __m512i),
                        flip,
                    );
                    for (r, s) in isum.iter_mut().enumerate() {
                        let xv = _mm512_set1_epi32(x4(xb, r, 4 * c));
                        *s = _mm512_dpbusd_epi32(*s, wv, xv);
                    }
                };
                unroll!(eighth: 0 1 2 3 4 5 6 7);
            } else if looked_up(T) {
                // Each nibble looked up (`vpshufb`, per 128-bit lane) as its value plus 128,
                // an unsigned byte as Q8_0's flipped weights, the sums starting at `c`.
                for (r, s) in isum.iter_mut().enumerate() {
                    *s = _mm512_set1_epi32(*a.c.get_unchecked(j + r));
                }
                let table = _mm512_broadcast_i32x4(_mm_loadu_si128(
                    IQ4_UNSIGNED.as_ptr() as *const __m128i
                ));
                let mut quarter = |c: usize| {
                    let raw = _mm512_loadu_si512(wp.add(c * 64) as *const __m512i);
                    let lo = _mm512_shuffle_epi8(table, _mm512_and_si512(raw, mask));
                    let hi = _mm512_shuffle_epi8(
                        table,
                        _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask),
                    );
                    for (r, s) in isum.iter_mut().enumerate() {
                        let xl = _mm512_set1_epi32(x4(xb, r, 4 * c));
                        let xh = _mm512_set1_epi32(x4(xb, r, 16 + 4 * c));
                        *s = _mm512_dpbusd_epi32(*s, lo, xl);
                        *s = _mm512_dpbusd_epi32(*s, hi, xh);
                    }
                };
                unroll!(quarter: 0 1 2 3);
            } else {
                let sixteen = _mm512_set1_epi8(16);
                // The block's fifth bits (`QMatrix`): vector `j`'s in bit `j` of each byte.
                let fifths = if five_bit(T) {
                    _mm512_loadu_si512(wp.add(256) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                };
                let add_fifth = |v: __m512i, j: usize| {
                    let set = _mm512_test_epi8_mask(fifths, _mm512_set1_epi8((1u8 << j) as i8));
                    _mm512_mask_add_epi8(v, set, v, sixteen)
                };
                let mut quarter = |c: usize| {
                    let raw = _mm512_loadu_si512(wp.add(c * 64) as *const __m512i);
                    let mut lo = _mm512_and_si512(raw, mask);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
                    if five_bit(T) {
                        lo = add_fifth(lo, 2 * c);
                        hi = add_fifth(hi, 2 * c + 1);
                    }
                    for r in 0..R {
                        let xl = _mm512_set1_epi32(x4(xb, r, 4 * c));
                        let xh = _mm512_set1_epi32(x4(xb, r, 16 + 4 * c));
                        isum[r] = _mm512_dpbusd_epi32(isum[r], lo, xl);
                        // The high nibbles are the block's second 16 values.
                        let s = if two_sums(T) {
                            &mut isum2[r]
                        } else {
                            &mut isum[r]
                        };
                        *s = _mm512_dpbusd_epi32(*s, hi, xh);
                    }
                };
                unroll!(quarter: 0 1 2 3);
            }
            // K-quants: the codes (i8 for Q6_K and Q3_K, u8 for the others; Q2_K's scale in
            // the low nibble, its min in the high) times the super-block's scales.
            let kscale = |at: usize, kd_at: usize, min: bool| {
                let codes = _mm_loadu_si128(w.ks.as_ptr().add(pb * 2 * PJ + at) as *const __m128i);
                let mut codes = if signed_codes(T) {
                    _mm512_cvtepi8_epi32(codes)
                } else {
                    _mm512_cvtepu8_epi32(codes)
                };
                if T == T_Q2_K {
                    codes = if min {
                        _mm512_srli_epi32::<4>(codes)
                    } else {
                        _mm512_and_si512(codes, _mm512_set1_epi32(0x0f))
                    };
                }
                let kd = _mm512_loadu_ps(w.kd.as_ptr().add(pb / 8 * 2 * PJ + kd_at));
                _mm512_mul_ps(_mm512_cvtepi32_ps(codes), kd)
            };
            let dw = if k_scales(T) {
                kscale(0, 0, false)
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    w.d.as_ptr().add(pb * PJ) as *const __m256i
                ))
            };
            let mw = if no_offset(T) {
                _mm512_setzero_ps()
            } else if T == T_Q4_1 || T == T_Q5_1 {
                _mm512_cvtph_ps(_mm256_loadu_si256(
                    w.m.as_ptr().add(pb * PJ) as *const __m256i
                ))
            } else if T == T_Q2_K {
                // Both halves' scales multiply `d`.
                kscale(PJ, 0, false)
            } else if k_scales(T) {
                kscale(PJ, PJ, false)
            } else {
                _mm512_mul_ps(dw, _mm512_set1_ps(if T == T_Q5_0 { -16.0 } else { -8.0 }))
            };
            // Q2_K: each half's `−dmin·m`.
            let (n0, n1) = if T == T_Q2_K {
                (kscale(0, PJ, true), kscale(PJ, PJ, true))
            } else {
                (_mm512_setzero_ps(), _mm512_setzero_ps())
            };
            for (r, (ac, s)) in acc.iter_mut().zip(&isum).enumerate() {
                let i = j + r;
                let dx = *a.d.get_unchecked(i);
                if two_sums(T) {
                    // `mw` holds the second half's scale.
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                    *ac = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), scale, *ac);
                    let scale2 = _mm512_mul_ps(mw, _mm512_set1_ps(dx));
                    *ac = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum2[r]), scale2, *ac);
                    if T == T_Q2_K {
                        let lo = *halves.get_unchecked(i);
                        let hi = -*a.c.get_unchecked(i) / 128 - lo;
                        *ac = _mm512_fmadd_ps(n0, _mm512_set1_ps(dx * lo as f32), *ac);
                        *ac = _mm512_fmadd_ps(n1, _mm512_set1_ps(dx * hi as f32), *ac);
                    }
                    continue;
                }
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx));
                *ac = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), scale, *ac);
                if !no_offset(T) {
                    *ac = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s.get_unchecked(i)), *ac);
                }
            }
        }
        let valid = (w.rows - p * PJ).min(PJ);
        let m: __mmask16 = if valid == PJ {
            0xffff
        } else {
            (1u16 << valid) - 1
        };
        for (r, ac) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.at(r0 + r, p * PJ), m, *ac);
        }
    }

    /// # Safety
    /// The CPU must have the module's features; `p` < `w.panels`; `rs` within `a.rows`;
    /// `out` has `a.rows` rows of at least `w.rows` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn panel<const T: u8>(a: &QActs, rs: Rows, w: &QMatrix, p: usize, out: Out) {
        let (mut r, end) = rs;
        // 16 rows a tile: 16 independent `vpdpbusd` chains (8 left the two ports waiting on
        // the 5-cycle latency) and each unpacked weight shared by twice the rows; the float
        // accumulators spill to L1, cheaply (24 rows spilled the integer sums: slower).
        // The types scaled per half keep two sums a row: 8 rows a tile.
        while !two_sums(T) && r + 16 <= end {
            tile::<T, 16>(a, r, w, p, out, r == rs.0);
            r += 16;
        }
        while r + 8 <= end {
            tile::<T, 8>(a, r, w, p, out, r == rs.0);
            r += 8;
        }
        while r + 4 <= end {
            tile::<T, 4>(a, r, w, p, out, r == rs.0);
            r += 4;
        }
        while r < end {
            tile::<T, 1>(a, r, w, p, out, r == rs.0);
            r += 1;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{
        five_bit, k_scales, looked_up, no_offset, panel_block_bytes, prefetch_ahead, signed_codes,
        two_sums, value_offset, x4, Out, QActs, QMatrix, Rows, IQ4_VALUES, PJ, QK, T_Q2_K, T_Q4_1,
        T_Q5_0, T_Q5_1, T_Q6_K, T_Q8_0,
    };
    use std::arch::x86_64::*;

    /// As the VNNI tile on one half (8 weight rows) of a panel: `vpmaddubsw` + `vpmaddwd`
    /// per 4-byte group (Q8_0: |w| against x with w's sign, which keeps the i16 pair sums
    /// below saturation).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: u8, const R: usize>(
        a: &QActs,
        r0: usize,
        w: &QMatrix,
        p: usize,
        half: usize,
        out: Out,
        prefetch: bool,
    ) {
        let nb = a.blocks;
        let pbb = panel_block_bytes(T);
        // The tile's rows share a chunk (`panel` asserts its rows are one), so each row's
        // bytes and scales lie at fixed offsets from its block's first row.
        let (j0, step) = a.row_start(r0);
        let mask = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        // As the VNNI tile's.
        let halves: &[i32] = if T == T_Q2_K { a.half_sums() } else { &[] };
        let offsets: &[i32] = if value_offset(T) != 0 {
            a.half_offsets(value_offset(T))
        } else {
            &[]
        };
        for b in 0..nb {
            let pb = p * nb + b;
            let j = j0 + b * step;
            let xb = a.q.as_ptr().add(j * QK) as *const u8;
            let wp = w.qs.as_ptr().add(pb * pbb + half * 32);
            if prefetch {
                // As the VNNI tile's (both halves' bytes share each 64-byte line).
                prefetch_ahead::<T>(w, pb);
            }
            let mut isum = [_mm256_setzero_si256(); R];
            // Types scaled per half: the second half's sums (the first half's in `isum`).
            let mut isum2 = [_mm256_setzero_si256(); R];
            if value_offset(T) != 0 {
                // As the VNNI tile's.
                for r in 0..R {
                    isum[r] = _mm256_set1_epi32(*offsets.get_unchecked(2 * (j + r)));
                    isum2[r] = _mm256_set1_epi32(*offsets.get_unchecked(2 * (j + r) + 1));
                }
            }
            let dot =
                |wu: __m256i, x: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(wu, x), ones);
            if T == T_Q6_K {
                // Unsigned values below 64: a pair's sum is at most 2·63·127, no saturation.
                let mut eighth = |c: usize| {
                    let wv = _mm256_loadu_si256(wp.add(c * 64) as *const __m256i);
                    let sums = if c < 4 { &mut isum } else { &mut isum2 };
                    for (r, s) in sums.iter_mut().enumerate() {
                        let xv = _mm256_set1_epi32(x4(xb, r, 4 * c));
                        *s = _mm256_add_epi32(*s, dot(wv, xv));
                    }
                };
                unroll!(eighth: 0 1 2 3 4 5 6 7);
            } else if T == T_Q8_0 {
                let mut eighth = |c: usize| {
                    let wv = _mm256_loadu_si256(wp.add(c * 64) as *const __m256i);
                    let wa = _mm256_sign_epi8(wv, wv);
                    for (r, s) in isum.iter_mut().enumerate() {
                        let xv = _mm256_set1_epi32(x4(xb, r, 4 * c));
                        *s = _mm256_add_epi32(*s, dot(wa, _mm256_sign_epi8(xv, wv)));
                    }
                };
                unroll!(eighth: 0 1 2 3 4 5 6 7);
            } else if looked_up(T) {
                // Each nibble looked up as its signed value (`vpshufb`), then Q8_0's products.
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                    IQ4_VALUES.as_ptr() as *const __m128i
                ));
                let mut quarter = |c: usize| {
                    let raw = _mm256_loadu_si256(wp.add(c * 64) as *const __m256i);
                    let lo = _mm256_shuffle_epi8(table, _mm256_and_si256(raw, mask));
                    let hi = _mm256_shuffle_epi8(
                        table,
                        _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask),
                    );
                    let (la, ha) = (_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(hi, hi));
                    for (r, s) in isum.iter_mut().enumerate() {
                        let xl = _mm256_set1_epi32(x4(xb, r, 4 * c));
                        let xh = _mm256_set1_epi32(x4(xb, r, 16 + 4 * c));
                        *s = _mm256_add_epi32(*s, dot(la, _mm256_sign_epi8(xl, lo)));
                        *s = _mm256_add_epi32(*s, dot(ha, _mm256_sign_epi8(xh, hi)));
                    }
                };
                unroll!(quarter: 0 1 2 3);
            } else {
                // Q4's pair sums are small (|u·x + u'·x'| ≤ 2·15·127 = 3,810), so a block's
                // eight of them add up exactly in i16 (≤ 30,480) and one `vpmaddwd` per block
                // widens them, where one per pair kept the multiply ports twice as busy. Q5's
                // (≤ 2·31·127 = 7,874) are widened every two quarters (four pairs: ≤ 31,496).
                // Q3_K's and Q2_K's halves (values below 8) each have their own.
                let mut s16 = [_mm256_setzero_si256(); R];
                let mut s16h = [_mm256_setzero_si256(); R];
                let sixteen = _mm256_set1_epi8(16);
                // This half's fifth bits (`QMatrix`): vector `j`'s in bit `j` of each byte,
                // shifted to bit 4 (16-bit shifts by at most 4: no bit crosses into another
                // byte's bit 4) and masked. `j` is a constant once the quarters are unrolled.
                let fifths = if five_bit(T) {
                    _mm256_loadu_si256(wp.add(256) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                let fifth = |j: usize| {
                    let at4 = match j {
                        0 => _mm256_slli_epi16::<4>(fifths),
                        1 => _mm256_slli_epi16::<3>(fifths),
                        2 => _mm256_slli_epi16::<2>(fifths),
                        3 => _mm256_slli_epi16::<1>(fifths),
                        4 => fifths,
                        5 => _mm256_srli_epi16::<1>(fifths),
                        6 => _mm256_srli_epi16::<2>(fifths),
                        _ => _mm256_srli_epi16::<3>(fifths),
                    };
                    _mm256_and_si256(at4, sixteen)
                };
                let mut quarter = |c: usize| {
                    let raw = _mm256_loadu_si256(wp.add(c * 64) as *const __m256i);
                    let mut lo = _mm256_and_si256(raw, mask);
                    let mut hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                    if five_bit(T) {
                        lo = _mm256_or_si256(lo, fifth(2 * c));
                        hi = _mm256_or_si256(hi, fifth(2 * c + 1));
                    }
                    for r in 0..R {
                        let xl = _mm256_set1_epi32(x4(xb, r, 4 * c));
                        let xh = _mm256_set1_epi32(x4(xb, r, 16 + 4 * c));
                        s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, xl));
                        let s = if two_sums(T) {
                            &mut s16h[r]
                        } else {
                            &mut s16[r]
                        };
                        *s = _mm256_add_epi16(*s, _mm256_maddubs_epi16(hi, xh));
                    }
                    if five_bit(T) && c % 2 == 1 {
                        for (s, s16) in isum.iter_mut().zip(s16.iter_mut()) {
                            *s = _mm256_add_epi32(*s, _mm256_madd_epi16(*s16, ones));
                            *s16 = _mm256_setzero_si256();
                        }
                    }
                };
                unroll!(quarter: 0 1 2 3);
                if !five_bit(T) {
                    for (s, s16) in isum.iter_mut().zip(&s16) {
                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(*s16, ones));
                    }
                }
                if two_sums(T) {
                    for (s, s16) in isum2.iter_mut().zip(&s16h) {
                        *s = _mm256_add_epi32(*s, _mm256_madd_epi16(*s16, ones));
                    }
                }
            }
            let sp = pb * PJ + half * 8;
            // As the VNNI tile's, on this half's 8 rows.
            let kscale = |at: usize, kd_at: usize, min: bool| {
                let codes = _mm_loadl_epi64(
                    w.ks.as_ptr().add(pb * 2 * PJ + at + half * 8) as *const __m128i
                );
                let mut codes = if signed_codes(T) {
                    _mm256_cvtepi8_epi32(codes)
                } else {
                    _mm256_cvtepu8_epi32(codes)
                };
                if T == T_Q2_K {
                    codes = if min {
                        _mm256_srli_epi32::<4>(codes)
                    } else {
                        _mm256_and_si256(codes, _mm256_set1_epi32(0x0f))
                    };
                }
                let kd = _mm256_loadu_ps(w.kd.as_ptr().add(pb / 8 * 2 * PJ + kd_at + half * 8));
                _mm256_mul_ps(_mm256_cvtepi32_ps(codes), kd)
            };
            let dw = if k_scales(T) {
                kscale(0, 0, false)
            } else {
                _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(sp) as *const __m128i))
            };
            let mw = if no_offset(T) {
                _mm256_setzero_ps()
            } else if T == T_Q4_1 || T == T_Q5_1 {
                _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(sp) as *const __m128i))
            } else if T == T_Q2_K {
                kscale(PJ, 0, false)
            } else if k_scales(T) {
                kscale(PJ, PJ, false)
            } else {
                _mm256_mul_ps(dw, _mm256_set1_ps(if T == T_Q5_0 { -16.0 } else { -8.0 }))
            };
            let (n0, n1) = if T == T_Q2_K {
                (kscale(0, PJ, true), kscale(PJ, PJ, true))
            } else {
                (_mm256_setzero_ps(), _mm256_setzero_ps())
            };
            for (r, (ac, s)) in acc.iter_mut().zip(&isum).enumerate() {
                let i = j + r;
                let dx = *a.d.get_unchecked(i);
                if two_sums(T) {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                    *ac = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), scale, *ac);
                    let scale2 = _mm256_mul_ps(mw, _mm256_set1_ps(dx));
                    *ac = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum2[r]), scale2, *ac);
                    if T == T_Q2_K {
                        let lo = *halves.get_unchecked(i);
                        let hi = -*a.c.get_unchecked(i) / 128 - lo;
                        *ac = _mm256_fmadd_ps(n0, _mm256_set1_ps(dx * lo as f32), *ac);
                        *ac = _mm256_fmadd_ps(n1, _mm256_set1_ps(dx * hi as f32), *ac);
                    }
                    continue;
                }
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(dx));
                *ac = _mm256_fmadd_ps(_mm256_cvtepi32_ps(*s), scale, *ac);
                if !no_offset(T) {
                    *ac = _mm256_fmadd_ps(mw, _mm256_set1_ps(*a.s.get_unchecked(i)), *ac);
                }
            }
        }
        let j0 = p * PJ + half * 8;
        let valid = w.rows.saturating_sub(j0).min(8);
        for (r, ac) in acc.iter().enumerate() {
            let dst = out.at(r0 + r, j0);
            if valid == 8 {
                _mm256_storeu_ps(dst, *ac);
            } else {
                let mut tmp = [0f32; 8];
                _mm256_storeu_ps(tmp.as_mut_ptr(), *ac);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, valid);
            }
        }
    }

    /// # Safety
    /// As `vnni::panel`, for AVX2.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel<const T: u8>(a: &QActs, rs: Rows, w: &QMatrix, p: usize, out: Out) {
        for half in 0..2 {
            if p * PJ + half * 8 >= w.rows {
                break;
            }
            let (mut r, end) = rs;
            // The first half's first tile brings the panel's lines in for both halves.
            while r + 4 <= end {
                tile::<T, 4>(a, r, w, p, half, out, half == 0 && r == rs.0);
                r += 4;
            }
            while r < end {
                tile::<T, 1>(a, r, w, p, half, out, half == 0 && r == rs.0);
                r += 1;
            }
        }
    }
}

fn panel(isa: QIsa, a: &QActs, rs: Rows, w: &QMatrix, p: usize, out: Out) {
    // The vector tiles address a tile's rows from its first one, which holds within one
    // layout chunk only (`QActs::at`): the callers' row ranges are those chunks.
    assert!(
        rs.0.is_multiple_of(ROW_CHUNK)
            && rs.0 <= rs.1
            && rs.1 - rs.0 <= ROW_CHUNK
            && rs.1 <= a.rows,
        "row range {rs:?} is not within one chunk of {} rows",
        a.rows
    );
    macro_rules! by_type {
        ($($f:ident)::+) => {
            match w.ty {
                QType::Q4_0 => $($f)::+::<T_Q4_0>(a, rs, w, p, out),
                QType::Q4_1 => $($f)::+::<T_Q4_1>(a, rs, w, p, out),
                QType::Q8_0 => $($f)::+::<T_Q8_0>(a, rs, w, p, out),
                QType::Q4K => $($f)::+::<T_Q4_K>(a, rs, w, p, out),
                QType::Q6K => $($f)::+::<T_Q6_K>(a, rs, w, p, out),
                QType::Q5_0 => $($f)::+::<T_Q5_0>(a, rs, w, p, out),
                QType::Q5_1 => $($f)::+::<T_Q5_1>(a, rs, w, p, out),
                QType::Q5K => $($f)::+::<T_Q5_K>(a, rs, w, p, out),
                QType::Q3K => $($f)::+::<T_Q3_K>(a, rs, w, p, out),
                QType::Q2K => $($f)::+::<T_Q2_K>(a, rs, w, p, out),
                QType::IQ4NL => $($f)::+::<T_IQ4_NL>(a, rs, w, p, out),
                QType::IQ4XS => $($f)::+::<T_IQ4_XS>(a, rs, w, p, out),
            }
        };
    }
    match isa {
        // SAFETY: `isa` comes from `available_isas` (features detected at run time); `p` is a
        // panel of `w`, `rs` rows of `a` within one layout chunk (asserted), and `out` holds
        // `a.rows × w.rows` outputs (`qmatmul_wt_with`).
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx512Vnni => unsafe { by_type!(vnni::panel) },
        #[cfg(target_arch = "x86_64")]
        QIsa::Avx2 => unsafe { by_type!(avx2::panel) },
        _ => by_type!(panel_portable),
    }
}

/// `y [rows, w.rows] = x [rows, w.cols] · wᵀ` with the best kernel this CPU has.
pub fn qmatmul_wt(x: &[f32], rows: usize, w: &QMatrix) -> Vec<f32> {
    qmatmul_wt_with(best_isa(), x, rows, w)
}

/// [`qmatmul_wt`] on a chosen kernel (one of [`available_isas`]).
pub fn qmatmul_wt_with(isa: QIsa, x: &[f32], rows: usize, w: &QMatrix) -> Vec<f32> {
    assert_eq!(x.len(), rows * w.cols, "activation shape");
    qmatmul_acts_with(isa, &quantize_acts(x, rows, w.cols), w)
}

/// `y [a.rows, w.rows]` from activations already quantised ([`quantize_acts`],
/// [`quantize_swiglu`]) with the best kernel this CPU has.
pub fn qmatmul_acts(a: &QActs, w: &QMatrix) -> Vec<f32> {
    qmatmul_acts_with(best_isa(), a, w)
}

/// [`qmatmul_acts`] on a chosen kernel (one of [`available_isas`]).
pub fn qmatmul_acts_with(isa: QIsa, a: &QActs, w: &QMatrix) -> Vec<f32> {
    qmatmul_parts_with(isa, a, std::slice::from_ref(w))
}

/// `y [a.rows, Σ rows]`: the products with matrices stacked by rows (their outputs side by
/// side in that order), each in its own block type: a stacked q / k / v whose parts a
/// checkpoint stores in different types (a Q4_K_M file's Q6_K `attn_v`).
pub fn qmatmul_parts(a: &QActs, parts: &[QMatrix]) -> Vec<f32> {
    qmatmul_parts_with(best_isa(), a, parts)
}

/// [`qmatmul_parts`] on a chosen kernel (one of [`available_isas`]).
pub fn qmatmul_parts_with(isa: QIsa, a: &QActs, parts: &[QMatrix]) -> Vec<f32> {
    assert!(
        available_isas().contains(&isa),
        "{isa:?} is not available on this CPU"
    );
    let rows = a.rows;
    let out: usize = parts.iter().map(|w| w.rows).sum();
    let mut y: Vec<f32> = Vec::with_capacity(rows * out);
    let per_task = if rows <= ROW_CHUNK {
        DECODE_TASK_PANELS
    } else {
        TASK_PANELS
    };
    for w in parts {
        // Made here, once, rather than by the first task to ask.
        let _ = match w.ty {
            QType::Q6K => a.half_offsets(32),
            QType::Q3K => a.half_offsets(4),
            QType::Q2K => a.half_sums(),
            _ => &[],
        };
    }
    let mut col = 0;
    for w in parts {
        assert_eq!(a.blocks * QK, w.cols, "activation width");
        // This part's outputs: columns `col ..` of each row.
        let o = Out {
            y: y.as_mut_ptr().wrapping_add(col),
            stride: out,
            row0: 0,
            col0: 0,
        };
        // One parallel section for every (row chunk, panel group): a long prefill does not
        // fork and join once per chunk, and the output is never zeroed (every value is
        // written).
        let tasks = w.panels.div_ceil(per_task);
        (0..rows.div_ceil(ROW_CHUNK) * tasks)
            .into_par_iter()
            .for_each(|i| {
                let (c, t) = (i / tasks, i % tasks);
                let rs = (c * ROW_CHUNK, ((c + 1) * ROW_CHUNK).min(rows));
                for p in t * per_task..((t + 1) * per_task).min(w.panels) {
                    panel(isa, a, rs, w, p, o);
                }
            });
        col += w.rows;
    }
    // SAFETY: for each part, the tasks wrote every row (chunks cover 0..rows) of each of its
    // output columns (each panel stores its valid columns of each of its rows), and the parts'
    // columns tile `0..out`, so all `rows × out` values are initialised.
    unsafe { y.set_len(rows * out) };
    y
}

/// The MLP's gate and up projections with their rows interleaved in groups of 32 (gate rows
/// `32c .. 32c + 32`, then up rows `32c .. 32c + 32`: four panels), so that one task holds
/// both halves of block `c` of `silu(gate·x) · (up·x)` and quantises it for the down
/// projection from its own tile. The stacked form wrote every row's gate and up outputs
/// (a 2,024-row SmolLM2 prompt step: 25 MB a layer) and read them back to quantise them.
pub struct SwigluWeights {
    w: QMatrix,
    inter: usize,
}

impl SwigluWeights {
    /// From the stacked `[gate; up]` matrix (`2 · inter` rows); the matrix given back
    /// unchanged (`Err`) when `inter` is not a multiple of 32.
    pub fn new(stacked: QMatrix) -> Result<Self, Box<QMatrix>> {
        let inter = stacked.rows / 2;
        if !stacked.rows.is_multiple_of(2) || !inter.is_multiple_of(QK) || inter == 0 {
            return Err(Box::new(stacked));
        }
        // Panels are whole (16 | inter): panel `4c + k` of the result is gate panel
        // `2c + k` (k < 2) or up panel `inter/16 + 2c + k − 2`.
        let pp = inter / PJ;
        let order: Vec<usize> = (0..inter / QK)
            .flat_map(|c| [2 * c, 2 * c + 1, pp + 2 * c, pp + 2 * c + 1])
            .collect();
        // Panels in `order`, `per_panel` values each (an empty array: one the type lacks).
        fn permute<T: Copy>(v: &[T], per_panel: usize, order: &[usize]) -> Vec<T> {
            if v.is_empty() {
                return Vec::new();
            }
            order
                .iter()
                .flat_map(|&p| &v[p * per_panel..(p + 1) * per_panel])
                .copied()
                .collect()
        }
        let nb = stacked.blocks;
        let w = QMatrix {
            qs: Lines::from_bytes(&permute(
                &stacked.qs,
                nb * panel_block_bytes(stacked.ty.code()),
                &order,
            )),
            d: permute(&stacked.d, nb * PJ, &order),
            m: permute(&stacked.m, nb * PJ, &order),
            ks: permute(&stacked.ks, nb * 2 * PJ, &order),
            kd: permute(&stacked.kd, nb / 8 * 2 * PJ, &order),
            ..stacked
        };
        Ok(SwigluWeights { w, inter })
    }

    /// The block type of gate and up.
    pub fn ty(&self) -> QType {
        self.w.ty
    }

    /// `silu(gate·x) · (up·x)` for the rows of `a` (`x` quantised), quantised for the down
    /// projection as `quantize_swiglu` quantises it: the same bytes.
    pub fn quantized_product(&self, a: &QActs) -> QActs {
        self.quantized_product_with(best_isa(), a)
    }

    /// [`Self::quantized_product`] on a chosen kernel (one of [`available_isas`]).
    pub fn quantized_product_with(&self, isa: QIsa, a: &QActs) -> QActs {
        assert!(
            available_isas().contains(&isa),
            "{isa:?} is not available on this CPU"
        );
        let w = &self.w;
        assert_eq!(a.blocks * QK, w.cols, "activation width");
        let (rows, nbo) = (a.rows, self.inter / QK);
        let mut q: Vec<i8> = Vec::with_capacity(rows * self.inter);
        let (mut d, mut s, mut c) = (
            vec![0f32; rows * nbo],
            vec![0f32; rows * nbo],
            vec![0i32; rows * nbo],
        );
        let dst = ProductOut {
            q: q.as_mut_ptr(),
            d: d.as_mut_ptr(),
            s: s.as_mut_ptr(),
            c: c.as_mut_ptr(),
        };
        // Tasks as `qmatmul_acts`'s (a row chunk × four panels), each ending in its block.
        (0..rows.div_ceil(ROW_CHUNK) * nbo)
            .into_par_iter()
            // Each thread's tile lives as long as the thread (`SWIGLU_TILE`): zeroing 16 KB a
            // task was a memset of ~23 MB a decode step, and `for_each_init` still allocated
            // and zeroed one per rayon split (calloc was ~2 % of a 32-row decode profile; the
            // step time did not move measurably).
            .for_each(|i| {
                SWIGLU_TILE.with_borrow_mut(|tile| {
                    tile.resize(ROW_CHUNK * 2 * QK, 0.0);
                    // The whole `ProductOut` (Sync), not its raw-pointer fields one by one.
                    let out = dst;
                    let (ch, b) = (i / nbo, i % nbo);
                    let rs = (ch * ROW_CHUNK, ((ch + 1) * ROW_CHUNK).min(rows));
                    let n = rs.1 - rs.0;
                    let o = Out {
                        y: tile.as_mut_ptr(),
                        stride: 2 * QK,
                        row0: rs.0,
                        col0: 4 * b * PJ,
                    };
                    for p in 4 * b..4 * b + 4 {
                        panel(isa, a, rs, w, p, o);
                    }
                    let mut tq = [MaybeUninit::<i8>::uninit(); ROW_CHUNK * QK];
                    let (mut td, mut ts, mut tc) =
                        ([0f32; ROW_CHUNK], [0f32; ROW_CHUNK], [0i32; ROW_CHUNK]);
                    crate::actquant::quantize_swiglu_block(
                        &tile[..n * 2 * QK],
                        n,
                        &mut tq[..n * QK],
                        &mut td[..n],
                        &mut ts[..n],
                        &mut tc[..n],
                    );
                    // Block `b` of the chunk's rows is one run in the layout (`QActs::at`).
                    let j = crate::actquant::block_at(rows, nbo, rs.0, b);
                    // SAFETY: task (chunk, b) alone writes block `b` of its chunk's rows: the
                    // `n` places from `j` (inside `rows × nbo` values and 32 × as many bytes),
                    // from its tile's quantised bytes (all written by `quantize_swiglu_block`).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            tq.as_ptr() as *const i8,
                            out.q.add(j * QK),
                            n * QK,
                        );
                        std::ptr::copy_nonoverlapping(td.as_ptr(), out.d.add(j), n);
                        std::ptr::copy_nonoverlapping(ts.as_ptr(), out.s.add(j), n);
                        std::ptr::copy_nonoverlapping(tc.as_ptr(), out.c.add(j), n);
                    }
                })
            });
        // SAFETY: the tasks wrote every block of every row (chunks × blocks cover them).
        unsafe { q.set_len(rows * self.inter) };
        QActs {
            rows,
            blocks: nbo,
            q,
            d,
            s,
            c,
            h: std::sync::OnceLock::new(),
            o: Default::default(),
        }
    }
}

thread_local! {
    /// A thread's tile of gate and up outputs in [`SwigluWeights::quantized_product_with`]
    /// (every value is written before it is read; tasks do not nest).
    static SWIGLU_TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where [`SwigluWeights::quantized_product_with`]'s tasks put their blocks.
#[derive(Clone, Copy)]
struct ProductOut {
    q: *mut i8,
    d: *mut f32,
    s: *mut f32,
    c: *mut i32,
}

// SAFETY: each task writes its own (rows, block) places only.
unsafe impl Send for ProductOut {}
unsafe impl Sync for ProductOut {}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: usize, seed: u32) -> u32 {
        (i as u32)
            .wrapping_mul(2_654_435_761)
            .wrapping_add(seed.wrapping_mul(40_503))
            .rotate_left(13)
            .wrapping_mul(2_246_822_519)
    }

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((hash(i, seed) >> 8) as f32 / (1u32 << 24) as f32) - 0.5)
            .collect()
    }

    /// Random ggml blocks of `ty`: scales around 0.01, Q4_1 offsets negative as real
    /// checkpoints'.
    fn ggml_bytes(ty: QType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let nb = rows * cols / ty.block_values();
        let mut bytes = Vec::with_capacity(nb * ty.block_bytes());
        let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
        if matches!(ty, QType::Q4K | QType::Q5K) {
            // Super-block scale and min around 1e-3 (sub-block scales up to 63 of them),
            // random 6-bit scale / min pairs and values (Q5_K: and fifth bits).
            for b in 0..nb {
                let r = hash(b, seed);
                bytes.extend(h(4e-4 + (r % 1000) as f32 * 1e-6));
                bytes.extend(h(2e-3 + (r % 777) as f32 * 2e-6));
                let n = ty.block_bytes() - 4;
                bytes.extend((0..n).map(|k| (hash(b * 256 + k, seed ^ 0x5555) >> 7) as u8));
            }
            return bytes;
        }
        if ty == QType::Q3K {
            // Random high bits, 2-bit values and 6-bit scales, the super-block scale ~1e-3.
            for b in 0..nb {
                let r = hash(b, seed);
                bytes.extend((0..108).map(|k| (hash(b * 256 + k, seed ^ 0x7777) >> 7) as u8));
                bytes.extend(h(4e-4 + (r % 1000) as f32 * 1e-6));
            }
            return bytes;
        }
        if ty == QType::IQ4XS {
            // `d` ~1e-4 (block scales up to ±32 of it, values up to ±127), random scale bits
            // and indices.
            for b in 0..nb {
                let r = hash(b, seed);
                bytes.extend(h(1e-4 + (r % 1000) as f32 * 1e-7));
                bytes.extend((0..134).map(|k| (hash(b * 256 + k, seed ^ 0x2222) >> 7) as u8));
            }
            return bytes;
        }
        if ty == QType::Q2K {
            // Random 4-bit scale / min pairs and 2-bit values; `d` and `dmin` as Q4_K's.
            for b in 0..nb {
                let r = hash(b, seed);
                bytes.extend((0..80).map(|k| (hash(b * 256 + k, seed ^ 0x1111) >> 7) as u8));
                bytes.extend(h(4e-3 + (r % 1000) as f32 * 1e-5));
                bytes.extend(h(2e-3 + (r % 777) as f32 * 2e-6));
            }
            return bytes;
        }
        if ty == QType::Q6K {
            // Random 6-bit values and 8-bit scales, the super-block scale around 1e-3.
            for b in 0..nb {
                let r = hash(b, seed);
                bytes.extend((0..208).map(|k| (hash(b * 256 + k, seed ^ 0x3333) >> 7) as u8));
                bytes.extend(h(4e-4 + (r % 1000) as f32 * 1e-6));
            }
            return bytes;
        }
        for b in 0..nb {
            let r = hash(b, seed);
            bytes.extend(h(0.002 + (r % 1000) as f32 * 2e-5));
            if matches!(ty, QType::Q4_1 | QType::Q5_1) {
                bytes.extend(h(-0.1 - (r % 777) as f32 * 1e-4));
            }
            // Q5: the 4 bytes of fifth bits, then the nibbles.
            let n = match ty {
                QType::Q8_0 => 32,
                QType::Q5_0 | QType::Q5_1 => 20,
                _ => 16,
            };
            bytes.extend((0..n).map(|k| (hash(b * 64 + k, seed ^ 0x5555) >> 7) as u8));
        }
        bytes
    }

    fn matrix(ty: QType, rows: usize, cols: usize, seed: u32) -> QMatrix {
        QMatrix::new(ty, rows, cols, ggml_bytes(ty, rows, cols, seed)).unwrap()
    }

    /// f64 dot products of the dequantised weights with the dequantised activations, and the
    /// sum of |terms| (the scale of f32 rounding).
    fn reference(a: &QActs, w: &QMatrix) -> Vec<(f64, f64)> {
        let mut wf = vec![0f32; w.cols];
        let mut y = vec![(0f64, 0f64); a.rows * w.rows];
        for j in 0..w.rows {
            w.dequant_row(j, &mut wf);
            for r in 0..a.rows {
                let (mut s, mut m) = (0f64, 0f64);
                for (k, &wv) in wf.iter().enumerate() {
                    let j = a.at(r, k / QK);
                    let xv = a.q[j * QK + k % QK] as f64 * a.d[j] as f64;
                    s += wv as f64 * xv;
                    m += (wv as f64 * xv).abs();
                }
                y[r * w.rows + j] = (s, m);
            }
        }
        y
    }

    const TYPES: [QType; 12] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q6K,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q5K,
        QType::Q3K,
        QType::Q2K,
        QType::IQ4NL,
        QType::IQ4XS,
    ];

    #[test]
    fn each_type_is_held_near_its_file_size() {
        // Bytes a 32-value block of one weight row holds: the file's for the 32-value types;
        // the K-quants' 256-value super-blocks (144, 176, 210, 110 and 84 bytes in the file:
        // 18, 22, 26.25, 13.75 and 10.5 a block) as 16 bytes of nibbles (and 4 of fifth
        // bits) / 32 of values, 2 of scale codes and 1 of the super-block's f32 scales.
        for (ty, per_block) in [
            (QType::Q4_0, 18),
            (QType::Q4_1, 20),
            (QType::Q5_0, 22),
            (QType::Q5_1, 24),
            (QType::Q8_0, 34),
            (QType::Q4K, 19),
            (QType::Q5K, 23),
            (QType::Q6K, 35),
            (QType::Q3K, 19),
            (QType::Q2K, 19),
            (QType::IQ4NL, 18),
            (QType::IQ4XS, 19),
        ] {
            let (rows, cols) = (48, 512);
            let w = matrix(ty, rows, cols, 3);
            assert_eq!(w.bytes(), rows * cols / QK * per_block, "{ty:?}");
        }
    }

    #[test]
    fn dequant_row_matches_the_model_crate() {
        for ty in TYPES {
            let (rows, cols) = (19, 2 * ty.block_values().max(48));
            let bytes = ggml_bytes(ty, rows, cols, 7);
            let w = QMatrix::new(ty, rows, cols, bytes.clone()).unwrap();
            let all = tpuserve_model::dequant::dequantize(ty.ggml(), &bytes, rows * cols).unwrap();
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                w.dequant_row(r, &mut row);
                assert_eq!(row, all[r * cols..(r + 1) * cols], "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_f64_reference_for_every_shape_and_tail() {
        eprintln!("kernels on this CPU: {:?}", available_isas());
        for isa in available_isas() {
            for ty in TYPES {
                for &(out, inner) in &[
                    (1usize, 32usize),
                    (3, 64),
                    (70, 96),
                    (130, 160),
                    (67, 576),
                    (17, 1536),
                    (3, 256),
                    (70, 512),
                ] {
                    if !inner.is_multiple_of(ty.block_values()) {
                        continue;
                    }
                    // 67 and 130 rows: more than one row chunk (64) in the output and in the quantisation.
                    for rows in (1..=9).chain([13, 21, 67, 130]) {
                        let w = matrix(ty, out, inner, (out * 31 + inner) as u32);
                        let x = data(rows * inner, rows as u32);
                        let y = qmatmul_wt_with(isa, &x, rows, &w);
                        let r = reference(&quantize_acts(&x, rows, inner), &w);
                        for (i, (a, &(b, m))) in y.iter().zip(&r).enumerate() {
                            assert!(
                                (*a as f64 - b).abs() <= 1e-5 * (1.0 + m),
                                "{isa:?} {ty:?} {rows}x{out}x{inner} [{i}]: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The paired gate/up weights give the bytes of the stacked matmul's output quantised by
    /// `quantize_swiglu`, on every kernel and type, over row counts across and between row
    /// chunks; an intermediate size that is not whole 32-blocks keeps the stacked form.
    #[test]
    fn the_paired_swiglu_product_equals_the_stacked_matmul_quantised() {
        for isa in available_isas() {
            for ty in TYPES {
                for &(inter, inner) in &[
                    (32usize, 64usize),
                    (96, 160),
                    (160, 96),
                    (32, 256),
                    (96, 512),
                ] {
                    if !inner.is_multiple_of(ty.block_values()) {
                        continue;
                    }
                    let seed = (inter * 7 + inner) as u32;
                    let paired = SwigluWeights::new(matrix(ty, 2 * inter, inner, seed))
                        .ok()
                        .expect("whole blocks");
                    let stacked = matrix(ty, 2 * inter, inner, seed);
                    for rows in [1, 5, 9, 64, 67, 130] {
                        let a = quantize_acts(&data(rows * inner, rows as u32), rows, inner);
                        let want =
                            quantize_swiglu(&qmatmul_acts_with(isa, &a, &stacked), rows, inter);
                        let got = paired.quantized_product_with(isa, &a);
                        let what = format!("{isa:?} {ty:?} {rows}x{inter}x{inner}");
                        assert_eq!((got.rows, got.blocks), (want.rows, want.blocks), "{what}");
                        assert_eq!(got.q, want.q, "{what}: bytes");
                        assert_eq!(got.d, want.d, "{what}: scales");
                        assert_eq!(got.s, want.s, "{what}: sums");
                        assert_eq!(got.c, want.c, "{what}: offsets");
                    }
                }
            }
        }
        assert!(SwigluWeights::new(matrix(QType::Q4_1, 2 * 48, 64, 1)).is_err());
        assert!(SwigluWeights::new(matrix(QType::Q4_1, 65, 64, 1)).is_err());
    }

    /// Parts in different block types stacked by rows give each part's own product, bit for
    /// bit, side by side in order: on every kernel, over row counts across row chunks.
    #[test]
    fn stacked_parts_give_each_parts_product_side_by_side() {
        let inner = 512;
        let parts = [
            matrix(QType::Q4K, 48, inner, 1),
            matrix(QType::Q4K, 17, inner, 2),
            matrix(QType::Q6K, 33, inner, 3),
            matrix(QType::Q8_0, 16, inner, 4),
        ];
        let out: usize = parts.iter().map(|w| w.rows).sum();
        for isa in available_isas() {
            for rows in [1, 7, 64, 67] {
                let a = quantize_acts(&data(rows * inner, rows as u32), rows, inner);
                let y = qmatmul_parts_with(isa, &a, &parts);
                assert_eq!(y.len(), rows * out);
                let mut col = 0;
                for w in &parts {
                    let one = qmatmul_acts_with(isa, &a, w);
                    for r in 0..rows {
                        assert_eq!(
                            &y[r * out + col..r * out + col + w.rows],
                            &one[r * w.rows..(r + 1) * w.rows],
                            "{isa:?} {:?} part at column {col}, row {r} of {rows}",
                            w.ty
                        );
                    }
                    col += w.rows;
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_any_batch() {
        for isa in available_isas() {
            for ty in TYPES {
                let inner = if ty.block_values() == 256 { 256 } else { 160 };
                let w = matrix(ty, 131, inner, 3);
                let x = data(70 * inner, 4);
                for at in [2, 66] {
                    let alone = qmatmul_wt_with(isa, &x[at * inner..(at + 1) * inner], 1, &w);
                    for rows in [3, 4, 5, 7, 9, 67, 70] {
                        if rows <= at {
                            continue;
                        }
                        let y = qmatmul_wt_with(isa, &x[..rows * inner], rows, &w);
                        assert_eq!(
                            &y[at * 131..(at + 1) * 131],
                            &alone[..],
                            "{isa:?} {ty:?}: row {at} in a batch of {rows}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn kernels_agree_with_the_f32_path_on_dequantised_weights() {
        // The int8 activations cost a little accuracy, no more: within 1 % of the output scale.
        let (out, rows) = (40, 3);
        for ty in TYPES {
            let inner = if ty.block_values() == 256 { 512 } else { 576 };
            let x = data(rows * inner, 9);
            let w = matrix(ty, out, inner, 5);
            let wf = (0..out)
                .flat_map(|j| {
                    let mut r = vec![0f32; inner];
                    w.dequant_row(j, &mut r);
                    r
                })
                .collect::<Vec<_>>();
            let f = crate::matvec::matmul_wt(&x, rows, &wf, out, inner);
            let q = qmatmul_wt(&x, rows, &w);
            let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in q.iter().zip(&f) {
                assert!((a - b).abs() <= 0.01 * scale, "{ty:?}: {a} vs {b}");
            }
        }
    }
}
