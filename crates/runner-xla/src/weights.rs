//! Places the model's weights on the devices as the stacked, sharded buffers the step programs
//! take, at the speed of storage and the host-to-device link:
//! - every tensor goes to the devices as the checkpoint's bytes (never widened to f32 on the
//!   way): a row shard straight from the memory map, a column shard gathered row by row;
//! - many layers transfer at once (a pool of threads; with TP every device's shard of a layer
//!   is its own transfer), and the next argument's bytes are read ahead (`madvise`) while the
//!   current one uploads;
//! - conversion to the device dtype, the transpose into the `[in, out]` layout the dots
//!   consume and the stacking into `[layers, ...]` happen on the devices, in one small
//!   program per argument run once (device memory holds the raw and the laid-out copy of
//!   one argument at a time);
//! - host memory holds the tensors in flight, never a copy of the model (a GGUF tensor is
//!   dequantised on the host, one layer per thread);
//! - with `--quantization int8` each projection and the LM head is quantised on the host as
//!   it is read, one layer per thread (see [`crate::quant`]), and goes to the devices as int8
//!   with its per-channel scales; the devices then only transpose and stack it.
//!
//! `--load-format dummy` and the KV cache never touch the host: a tiny program fills them on
//! the devices (see [`fill`]).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use rayon::prelude::*;
use tpuserve_model::{DType, HostTensor, LlamaConfig, WeightSource};
use tpuserve_pjrt::{AlignedBytes, Buffer, Client, CompileOptions, Device, ElementType};
use tpuserve_runner_api::RunnerError;

use crate::hlo::{self, Arg, Elem, Ty};
use crate::program::{arg, arg_sharding, split_sharding, uniform_hash, ProgramConfig, WeightElem};
use crate::quant::{quantize_rows, Quantization};

fn werr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Weights(e.to_string())
}

fn derr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Device(e.to_string())
}

/// What placing the weights cost, for the start-up log (`kubectl logs` shows a slow disk or
/// link by phase).
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Bytes placed on the devices (all shards of all devices).
    pub bytes: u64,
    /// Reading the checkpoint and transferring its bytes (the reads happen inside the
    /// transfers, from the memory map, several layers at once).
    pub upload: Duration,
    /// The on-device layout programs (convert, transpose, stack).
    pub layout: Duration,
    pub wall: Duration,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let gb = self.bytes as f64 / 1e9;
        let rate = |d: Duration| gb * 1e3 / d.as_secs_f64().max(1e-9);
        if self.upload.is_zero() {
            return format!(
                "{gb:.2} GB filled on the devices in {:.2}s (no host bytes)",
                self.wall.as_secs_f64()
            );
        }
        format!(
            "{gb:.2} GB placed in {:.2}s ({:.0} MB/s): read+upload {:.2}s ({:.0} MB/s), \
             on-device layout {:.2}s",
            self.wall.as_secs_f64(),
            rate(self.wall),
            self.upload.as_secs_f64(),
            rate(self.upload),
            self.layout.as_secs_f64(),
        )
    }
}

/// One little-endian element of `dtype` as f32 (exact for every weight dtype).
pub(crate) fn widen(dtype: DType, c: &[u8]) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        DType::F16 => f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
        DType::BF16 => bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(),
    }
}

/// The tensor's bytes in `to`: borrowed when it already is, else converted on all cores.
fn in_dtype<'a>(t: &'a HostTensor<'_>, to: DType) -> Cow<'a, [u8]> {
    if t.dtype == to {
        return Cow::Borrowed(&t.bytes);
    }
    const CHUNK: usize = 1 << 16;
    let (from_size, to_size) = (t.dtype.size_bytes(), to.size_bytes());
    let n = t.bytes.len() / from_size;
    let mut out = vec![0u8; n * to_size];
    let widen = |c: &[u8]| widen(t.dtype, c);
    out.par_chunks_mut(CHUNK * to_size)
        .zip(t.bytes.par_chunks(CHUNK * from_size))
        .for_each(|(dst, src)| {
            for (d, s) in dst
                .chunks_exact_mut(to_size)
                .zip(src.chunks_exact(from_size))
            {
                let v = widen(s);
                match to {
                    DType::F32 => d.copy_from_slice(&v.to_le_bytes()),
                    // Round to nearest even, as every other bf16 conversion here.
                    DType::BF16 => d.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes()),
                    DType::F16 => d.copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes()),
                }
            }
        });
    Cow::Owned(out)
}

/// Where the weights are converted, transposed and stacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// On the host for the XLA CPU plugin, on the device for every accelerator.
    #[default]
    Auto,
    Host,
    Device,
}

/// How the devices split an HF `[rows = out, cols = in]` matrix.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    /// By rows (`out`): column-parallel projections, the LM head, the embedding table.
    Rows,
    /// By columns (`in`): row-parallel projections (o_proj, down_proj).
    Cols,
}

/// One weight argument: its HF tensor(s) (one per layer when stacked), their `[rows, cols]`
/// and what the layout program does with them.
struct WeightPlan {
    index: usize,
    names: Vec<String>,
    rows: usize,
    cols: usize,
    split: Split,
    /// Stored `[in, out]` on the device (the layout the step's dots consume).
    transpose: bool,
    /// Stacked `[layers, ...]` even when there is one tensor.
    stacked: bool,
    /// Held as int8 with per-row (output channel) scales, the argument `arg::scale_of(index)`.
    quantize: bool,
}

impl WeightPlan {
    /// Rows (output channels) of each device's shard.
    fn shard_rows(&self, n: usize) -> usize {
        match self.split {
            Split::Rows => self.rows / n,
            Split::Cols => self.rows,
        }
    }

    /// Device `d`'s scales of every layer, `[layers, shard rows]` flat, from each layer's
    /// whole `[rows]`, and their dims.
    fn scale_shard(&self, per_layer: &[Vec<f32>], d: usize, n: usize) -> (Vec<f32>, Vec<i64>) {
        let r = self.shard_rows(n);
        let first = match self.split {
            Split::Rows => d * r,
            Split::Cols => 0,
        };
        let v: Vec<f32> = per_layer
            .iter()
            .flat_map(|s| s[first..first + r].iter().copied())
            .collect();
        let dims = if self.stacked {
            vec![per_layer.len() as i64, r as i64]
        } else {
            vec![r as i64]
        };
        (v, dims)
    }
}

fn plans(src: &dyn WeightSource, cfg: &LlamaConfig, quant: Quantization) -> Vec<WeightPlan> {
    let (h, qs, kvs, inter, vocab, layers) = (
        cfg.hidden_size,
        cfg.q_size(),
        cfg.kv_size(),
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.num_hidden_layers,
    );
    let per_layer = |suffix: &str| -> Vec<String> {
        (0..layers)
            .map(|l| format!("model.layers.{l}.{suffix}"))
            .collect()
    };
    let head = if src.contains("lm_head.weight") {
        "lm_head.weight"
    } else {
        "model.embed_tokens.weight"
    };
    // Every per-layer matrix but wq is stored transposed ([in, out]); all are stacked.
    let layer = |index: usize, suffix: &str, rows: usize, cols: usize, split: Split| WeightPlan {
        index,
        names: per_layer(suffix),
        rows,
        cols,
        split,
        transpose: true,
        stacked: true,
        quantize: quant.is_int8(),
    };
    let (rs, cs) = (Split::Rows, Split::Cols);
    vec![
        // The embedding table is looked up by row: kept as stored.
        WeightPlan {
            index: arg::EMBED,
            names: vec!["model.embed_tokens.weight".into()],
            rows: vocab,
            cols: h,
            split: rs,
            transpose: false,
            stacked: false,
            // Looked up by row, never read whole by a step: kept in the weight dtype.
            quantize: false,
        },
        WeightPlan {
            index: arg::LM_HEAD,
            names: vec![head.into()],
            rows: vocab,
            cols: h,
            split: rs,
            transpose: true,
            stacked: false,
            quantize: quant.is_int8(),
        },
        // wq stays [out, in], as stored (program.rs `linear` says why).
        WeightPlan {
            transpose: false,
            ..layer(arg::WQ, "self_attn.q_proj.weight", qs, h, rs)
        },
        layer(arg::WK, "self_attn.k_proj.weight", kvs, h, rs),
        layer(arg::WV, "self_attn.v_proj.weight", kvs, h, rs),
        layer(arg::WO, "self_attn.o_proj.weight", h, qs, cs),
        layer(arg::WG, "mlp.gate_proj.weight", inter, h, rs),
        layer(arg::WU, "mlp.up_proj.weight", inter, h, rs),
        layer(arg::WD, "mlp.down_proj.weight", h, inter, cs),
    ]
}

/// The host dtype of the device's weight dtype.
fn host_dtype(elem: WeightElem) -> DType {
    match elem {
        WeightElem::F32 => DType::F32,
        WeightElem::BF16 => DType::BF16,
    }
}

fn element_type(d: DType) -> (ElementType, Elem) {
    match d {
        DType::F32 => (ElementType::F32, Elem::F32),
        DType::F16 => (ElementType::F16, Elem::F16),
        DType::BF16 => (ElementType::BF16, Elem::BF16),
    }
}

/// Device `d`'s part of a row-major `[rows, cols]` tensor: a slice of it when split by rows
/// (straight from the memory map), gathered row by row when split by columns.
fn shard<'a>(
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    es: usize,
    split: Split,
    d: usize,
    n: usize,
) -> Cow<'a, [u8]> {
    match split {
        Split::Rows => {
            let len = rows / n * cols * es;
            Cow::Borrowed(&bytes[d * len..(d + 1) * len])
        }
        Split::Cols => {
            let (c, row) = (cols / n * es, cols * es);
            let mut out = Vec::with_capacity(rows * c);
            for r in 0..rows {
                out.extend_from_slice(&bytes[r * row + d * c..r * row + (d + 1) * c]);
            }
            Cow::Owned(out)
        }
    }
}

/// The layout program: `[rows, cols]` per-layer tensors in the checkpoint dtype (sharded as
/// uploaded) → the argument the step program takes (converted, transposed to `[in, out]`,
/// stacked `[layers, ...]`, sharded as `arg_sharding`). Runs once at start-up.
fn layout_program(p: &WeightPlan, input: Elem, output: Elem, tp: usize) -> String {
    let in_sharding = match (tp, p.split) {
        (1, _) => "{replicated}".to_string(),
        (_, Split::Rows) => split_sharding(tp as i64, 0, 2),
        (_, Split::Cols) => split_sharding(tp as i64, 1, 2),
    };
    let ty = Ty::new(&[p.rows as i64, p.cols as i64], input);
    let args: Vec<Arg> = p
        .names
        .iter()
        .map(|_| Arg {
            ty: ty.clone(),
            attrs: vec![format!("mhlo.sharding = \"{in_sharding}\"")],
        })
        .collect();
    let out_sharding = arg_sharding(p.index, tp as i64);
    hlo::module("weight_layout", tp, &args, |b, vals| {
        let parts: Vec<hlo::V> = vals
            .iter()
            .map(|v| {
                let x = if input == output {
                    v.clone()
                } else {
                    b.convert(v, output)
                };
                let x = if p.transpose {
                    b.transpose(&x, &[1, 0])
                } else {
                    x
                };
                if p.stacked {
                    let mut dims = vec![1];
                    dims.extend_from_slice(x.dims());
                    b.reshape(&x, &dims)
                } else {
                    x
                }
            })
            .collect();
        let out = if p.stacked {
            let refs: Vec<&hlo::V> = parts.iter().collect();
            b.concat(&refs, 0)
        } else {
            parts[0].clone()
        };
        vec![(out, Some(out_sharding))]
    })
}

/// Compiles a start-up program for `devices` and runs it once on per-device `inputs`.
fn run_once(
    client: &Client,
    devices: &[Device],
    text: &str,
    inputs: &[Vec<&Buffer>],
) -> Result<Vec<Buffer>, RunnerError> {
    let tp = devices.len();
    let options = if tp > 1 {
        CompileOptions::spmd(tp as i64)
    } else {
        CompileOptions::default()
    };
    let exe = client
        .compile(text, &options)
        .map_err(|e| derr(format!("compiling a start-up program: {e}")))?;
    let mut outs = exe.execute(inputs).map_err(derr)?;
    outs.iter_mut()
        .map(|o| {
            o.pop()
                .ok_or_else(|| derr("start-up program returned nothing"))
        })
        .collect()
}

/// One layer's shards on every device: (layer, `[device]`, bytes sent, int8 scales of the
/// whole layer).
type Uploaded = (usize, Vec<Buffer>, u64, Vec<f32>);

/// One argument placed on the devices: `[device]`, and (int8) its scales' `[device]`.
struct Placed {
    weight: Vec<Buffer>,
    scales: Option<Vec<Buffer>>,
}

/// What the devices receive of one argument before the layout program.
struct Raw {
    /// `[layer][device]`
    layers: Vec<Vec<Buffer>>,
    elem: Elem,
    bytes: u64,
    /// int8: each layer's `[rows]` scales.
    scales: Vec<Vec<f32>>,
}

struct Placer<'a> {
    client: &'a Client,
    devices: &'a [Device],
    src: &'a dyn WeightSource,
    elem: WeightElem,
    threads: usize,
    on_host: bool,
}

impl Placer<'_> {
    /// Uploads every tensor of `p` in its checkpoint dtype (converted on the host only when a
    /// layer's dtype differs from the first layer's) or quantised to int8, each device's shard
    /// separately, layers on `threads` threads at once.
    fn upload_raw(&self, p: &WeightPlan) -> Result<Raw, RunnerError> {
        let shape = [p.rows, p.cols];
        let dtype = self.src.tensor_dtype(&p.names[0]).map_err(werr)?;
        let (ety, elem, es) = if p.quantize {
            (ElementType::S8, Elem::I8, 1)
        } else {
            let (ety, elem) = element_type(dtype);
            (ety, elem, dtype.size_bytes())
        };
        let n = self.devices.len();
        let dims: [i64; 2] = match p.split {
            Split::Rows => [(p.rows / n) as i64, p.cols as i64],
            Split::Cols => [p.rows as i64, (p.cols / n) as i64],
        };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<Result<Vec<Uploaded>, RunnerError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..self.threads.min(p.names.len()))
                .map(|_| {
                    s.spawn(|| -> Result<Vec<Uploaded>, RunnerError> {
                        let mut done = Vec::new();
                        loop {
                            let l = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(name) = p.names.get(l) else { break };
                            let t = self.src.expect(name, &shape).map_err(werr)?;
                            let (bytes, scales) = if p.quantize {
                                let q = quantize_rows(&t, p.rows, p.cols);
                                (Cow::Owned(q.bytes), q.scales)
                            } else {
                                (in_dtype(&t, dtype), Vec::new())
                            };
                            let mut bufs = Vec::with_capacity(n);
                            let mut sent = 0u64;
                            for (d, dev) in self.devices.iter().enumerate() {
                                let part = shard(&bytes, p.rows, p.cols, es, p.split, d, n);
                                sent += part.len() as u64;
                                bufs.push(
                                    Buffer::from_host(self.client, &part, ety, &dims, dev)
                                        .map_err(derr)?,
                                );
                            }
                            done.push((l, bufs, sent, scales));
                        }
                        Ok(done)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(derr("an upload thread panicked")))
                })
                .collect()
        });
        let mut layers: Vec<Option<(Vec<Buffer>, Vec<f32>)>> =
            (0..p.names.len()).map(|_| None).collect();
        let mut bytes = 0;
        for r in results {
            for (l, bufs, sent, scales) in r? {
                layers[l] = Some((bufs, scales));
                bytes += sent;
            }
        }
        let (layers, scales) = layers
            .into_iter()
            .map(|l| l.ok_or_else(|| werr("a layer was not uploaded")))
            .collect::<Result<(Vec<_>, Vec<_>), _>>()?;
        Ok(Raw {
            layers,
            elem,
            bytes,
            scales: if p.quantize { scales } else { Vec::new() },
        })
    }

    /// The int8 scales of `p` on every device, from each layer's `[rows]` (small: uploaded
    /// as they are, stacked and sharded on the host).
    fn scale_buffers(
        &self,
        p: &WeightPlan,
        per_layer: &[Vec<f32>],
        report: &mut LoadReport,
    ) -> Result<Vec<Buffer>, RunnerError> {
        let n = self.devices.len();
        self.devices
            .iter()
            .enumerate()
            .map(|(d, dev)| {
                let (v, dims) = p.scale_shard(per_layer, d, n);
                report.bytes += (v.len() * 4) as u64;
                Buffer::from_slice(self.client, &v, &dims, dev).map_err(derr)
            })
            .collect()
    }

    /// One argument on the devices, as `[device]`.
    fn place(&self, p: &WeightPlan, report: &mut LoadReport) -> Result<Placed, RunnerError> {
        if self.on_host {
            return self.place_on_host(p, report);
        }
        let t = Instant::now();
        let mut raw = self.upload_raw(p)?;
        report.upload += t.elapsed();
        report.bytes += raw.bytes;
        let scales = if p.quantize {
            Some(self.scale_buffers(p, &raw.scales, report)?)
        } else {
            None
        };
        let input = raw.elem;
        let output = if p.quantize {
            Elem::I8
        } else {
            self.elem.elem()
        };
        if !p.transpose && !p.stacked && input == output {
            // Already the argument (the embedding table in the device dtype).
            let weight = raw.layers.pop().expect("one tensor");
            return Ok(Placed { weight, scales });
        }
        let t = Instant::now();
        let n = self.devices.len();
        let text = layout_program(p, input, output, n);
        let inputs: Vec<Vec<&Buffer>> = (0..n)
            .map(|d| raw.layers.iter().map(|l| &l[d]).collect())
            .collect();
        let weight = run_once(self.client, self.devices, &text, &inputs)?;
        report.layout += t.elapsed();
        Ok(Placed { weight, scales })
    }
}

/// Writes the block `src[r0..r1, c0..c1]` of a row-major `[_, cols]` matrix of `E`-byte
/// elements, transposed, into `dst` (`[c1 - c0, r1 - r0]`). Tiled so that both sides stay in
/// cache; split over destination rows on all cores.
fn transpose_into<const E: usize>(
    src: &[u8],
    cols: usize,
    (r0, r1): (usize, usize),
    (c0, c1): (usize, usize),
    dst: &mut [u8],
) {
    const TILE: usize = 32;
    let rows = r1 - r0;
    debug_assert_eq!(dst.len(), (c1 - c0) * rows * E);
    let per_task = (TILE * 8).min(c1 - c0).max(1);
    dst.par_chunks_mut(per_task * rows * E)
        .enumerate()
        .for_each(|(task, out)| {
            let cs = c0 + task * per_task;
            let ce = (cs + per_task).min(c1);
            for rt in (r0..r1).step_by(TILE) {
                let re = (rt + TILE).min(r1);
                for ct in (cs..ce).step_by(TILE) {
                    let cte = (ct + TILE).min(ce);
                    for c in ct..cte {
                        let o = (c - cs) * rows;
                        for r in rt..re {
                            let s = (r * cols + c) * E;
                            let d = (o + r - r0) * E;
                            out[d..d + E].copy_from_slice(&src[s..s + E]);
                        }
                    }
                }
            }
        });
}

fn transpose_block(
    esize: usize,
    src: &[u8],
    cols: usize,
    rows: (usize, usize),
    cs: (usize, usize),
    dst: &mut [u8],
) {
    match esize {
        1 => transpose_into::<1>(src, cols, rows, cs, dst),
        2 => transpose_into::<2>(src, cols, rows, cs, dst),
        4 => transpose_into::<4>(src, cols, rows, cs, dst),
        other => unreachable!("no {other}-byte weight dtype"),
    }
}

impl Placer<'_> {
    /// The XLA CPU device's memory is host memory and its programs run on one thread: there
    /// the layout (convert, transpose, stack) is done by the host's cores straight into
    /// 64-byte-aligned buffers that the plugin adopts without a copy.
    fn place_on_host(
        &self,
        p: &WeightPlan,
        report: &mut LoadReport,
    ) -> Result<Placed, RunnerError> {
        let t = Instant::now();
        let n = self.devices.len();
        let to = host_dtype(self.elem);
        let (ety, es) = if p.quantize {
            (ElementType::S8, 1)
        } else {
            (element_type(to).0, to.size_bytes())
        };
        let (sr, sc) = match p.split {
            Split::Rows => (p.rows / n, p.cols),
            Split::Cols => (p.rows, p.cols / n),
        };
        let mut dims: Vec<i64> = if p.stacked {
            vec![p.names.len() as i64]
        } else {
            vec![]
        };
        if p.transpose {
            dims.extend([sc as i64, sr as i64]);
        } else {
            dims.extend([sr as i64, sc as i64]);
        }
        let shard_bytes = sr * sc * es;
        let mut outs: Vec<AlignedBytes> = (0..n)
            .map(|_| AlignedBytes::zeroed(p.names.len() * shard_bytes))
            .collect();
        let mut jobs: Vec<Vec<&mut [u8]>> = p.names.iter().map(|_| Vec::with_capacity(n)).collect();
        for o in outs.iter_mut() {
            for (l, part) in o.as_mut_slice().chunks_mut(shard_bytes).enumerate() {
                jobs[l].push(part);
            }
        }
        let shape = [p.rows, p.cols];
        let read = std::sync::atomic::AtomicU64::new(0);
        let per_layer_scales = jobs
            .into_par_iter()
            .zip(p.names.par_iter())
            .map(|(dsts, name)| -> Result<Vec<f32>, RunnerError> {
                let t = self.src.expect(name, &shape).map_err(werr)?;
                read.fetch_add(t.bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let (b, scales) = if p.quantize {
                    let q = quantize_rows(&t, p.rows, p.cols);
                    (Cow::Owned(q.bytes), q.scales)
                } else {
                    (in_dtype(&t, to), Vec::new())
                };
                for (d, dst) in dsts.into_iter().enumerate() {
                    let (rr, cc) = match p.split {
                        Split::Rows => ((d * sr, (d + 1) * sr), (0, p.cols)),
                        Split::Cols => ((0, p.rows), (d * sc, (d + 1) * sc)),
                    };
                    if p.transpose {
                        transpose_block(es, &b, p.cols, rr, cc, dst);
                    } else {
                        dst.copy_from_slice(&shard(&b, p.rows, p.cols, es, p.split, d, n));
                    }
                }
                Ok(scales)
            })
            .collect::<Result<Vec<_>, _>>()?;
        report.upload += t.elapsed();
        report.bytes += read.into_inner();
        let scales = if p.quantize {
            Some(self.scale_buffers(p, &per_layer_scales, report)?)
        } else {
            None
        };
        let weight = outs
            .into_iter()
            .zip(self.devices)
            .map(|(bytes, dev)| {
                Buffer::from_host_owned(self.client, bytes, ety, &dims, dev).map_err(derr)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Placed { weight, scales })
    }
}

/// Norm weights: small, kept in f32, the same on every device.
fn norms(
    client: &Client,
    devices: &[Device],
    src: &dyn WeightSource,
    names: &[String],
    h: usize,
) -> Result<Vec<Buffer>, RunnerError> {
    let mut all = Vec::with_capacity(names.len() * h);
    for name in names {
        all.extend(src.expect(name, &[h]).map_err(werr)?.to_f32());
    }
    let dims: Vec<i64> = if names.len() == 1 {
        vec![h as i64]
    } else {
        vec![names.len() as i64, h as i64]
    };
    devices
        .iter()
        .map(|d| Buffer::from_slice(client, &all, &dims, d).map_err(derr))
        .collect()
}

/// The rotary inverse frequencies: computed, not read, and the same on every device.
fn rope_arg(
    client: &Client,
    devices: &[Device],
    cfg: &LlamaConfig,
) -> Result<Vec<Buffer>, RunnerError> {
    let inv = cfg.rope_inv_freq();
    devices
        .iter()
        .map(|d| Buffer::from_slice(client, &inv, &[inv.len() as i64], d).map_err(derr))
        .collect()
}

/// The place of weight argument `index` in the runner's list (`ProgramConfig::weight_args`).
pub fn weight_slot(index: usize) -> usize {
    if index < arg::NUM_WEIGHTS {
        index
    } else {
        arg::NUM_WEIGHTS + index - arg::S_LM_HEAD
    }
}

/// Every weight argument of the step program (with `quant` int8, then the scales), as
/// `[argument][device]` in `ProgramConfig::weight_args` order, and what it cost.
pub fn upload(
    client: &Client,
    devices: &[Device],
    src: &dyn WeightSource,
    cfg: &LlamaConfig,
    (elem, quant): (WeightElem, Quantization),
    layout: Layout,
) -> Result<(Vec<Vec<Buffer>>, LoadReport), RunnerError> {
    let t0 = Instant::now();
    let on_host = match layout {
        Layout::Host => true,
        Layout::Device => false,
        Layout::Auto => client.platform_name().is_ok_and(|p| p == "cpu"),
    };
    let placer = Placer {
        on_host,
        client,
        devices,
        src,
        elem,
        // Enough transfers in flight to keep every device's link and the storage busy.
        threads: std::thread::available_parallelism()
            .map_or(4, |p| p.get())
            .clamp(4, 32),
    };
    let plans = plans(src, cfg, quant);
    let mut report = LoadReport::default();
    let count = if quant.is_int8() {
        arg::NUM_WEIGHTS + arg::COUNT_INT8 - arg::S_LM_HEAD
    } else {
        arg::NUM_WEIGHTS
    };
    let mut slots: Vec<Option<Vec<Buffer>>> = (0..count).map(|_| None).collect();
    src.prefetch(&plans[0].names);
    for (k, p) in plans.iter().enumerate() {
        if let Some(next) = plans.get(k + 1) {
            src.prefetch(&next.names);
        }
        let placed = placer.place(p, &mut report)?;
        slots[p.index] = Some(placed.weight);
        if let (Some(s), Some(i)) = (placed.scales, arg::scale_of(p.index)) {
            slots[weight_slot(i)] = Some(s);
        }
    }
    let layers = cfg.num_hidden_layers;
    let per_layer = |suffix: &str| -> Vec<String> {
        (0..layers)
            .map(|l| format!("model.layers.{l}.{suffix}"))
            .collect()
    };
    let h = cfg.hidden_size;
    slots[arg::FINAL_NORM] = Some(norms(
        client,
        devices,
        src,
        &["model.norm.weight".into()],
        h,
    )?);
    slots[arg::IN_NORM] = Some(norms(
        client,
        devices,
        src,
        &per_layer("input_layernorm.weight"),
        h,
    )?);
    slots[arg::POST_NORM] = Some(norms(
        client,
        devices,
        src,
        &per_layer("post_attention_layernorm.weight"),
        h,
    )?);
    slots[arg::INV_FREQ] = Some(rope_arg(client, devices, cfg)?);
    report.wall = t0.elapsed();
    let out = slots
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| werr(format!("weight argument {i} was not placed"))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((out, report))
}

/// `--load-format dummy`: every weight argument filled on the devices (no host bytes, no
/// checkpoint), values uniform in ±`DUMMY_SCALE` as vLLM's dummy loader; the rotary
/// frequencies are real.
pub fn dummy(
    client: &Client,
    devices: &[Device],
    cfg: &LlamaConfig,
    program: &ProgramConfig,
) -> Result<(Vec<Vec<Buffer>>, LoadReport), RunnerError> {
    let t0 = Instant::now();
    let types = program.arg_types(crate::program::Bucket {
        tokens: 16,
        tile: 1,
        top_k: 0,
    });
    let mut out = Vec::with_capacity(program.weight_args().len());
    let mut report = LoadReport::default();
    let dummy = tpuserve_model::dummy::DUMMY_SCALE;
    for i in program.weight_args() {
        if i == arg::INV_FREQ {
            out.push(rope_arg(client, devices, cfg)?);
            continue;
        }
        let ty = &types[i];
        let fill = match ty.elem {
            // int8 values over the whole range, and scales that make them ±DUMMY_SCALE.
            Elem::I8 => Fill::Uniform {
                seed: i as u32 + 1,
                scale: 127.0,
            },
            _ if i >= arg::S_LM_HEAD => Fill::Constant(dummy / 127.0),
            _ => Fill::Uniform {
                seed: i as u32 + 1,
                scale: dummy,
            },
        };
        let bufs = fill::run(client, devices, ty, &arg_sharding(i, program.tp), fill)?;
        report.bytes += bufs
            .iter()
            .map(|b| b.on_device_size().unwrap_or(0) as u64)
            .sum::<u64>();
        out.push(bufs);
    }
    report.wall = t0.elapsed();
    Ok((out, report))
}

pub use fill::Fill;

/// Buffers produced on the devices by a tiny SPMD program with no inputs: the KV cache's
/// zeros (no host copy of a many-GB zero buffer) and dummy weights.
pub mod fill {
    use super::*;

    #[derive(Debug, Clone, Copy)]
    pub enum Fill {
        Zeros,
        Constant(f32),
        /// Uniform in `(-scale, scale)` from a hash of each element's index in the whole
        /// tensor (the sampler's hash, `program::uniform_hash`).
        Uniform {
            seed: u32,
            scale: f32,
        },
    }

    /// The program's text: one sharded output of type `ty`.
    pub fn program(ty: &Ty, sharding: &str, tp: usize, fill: Fill) -> String {
        hlo::module("fill", tp, &[] as &[Arg], |b, _| {
            let v = match fill {
                Fill::Zeros | Fill::Constant(_) => {
                    let v = match fill {
                        Fill::Constant(v) => v,
                        _ => 0.0,
                    };
                    let z = b.constant_f32(v, &[]);
                    let z = b.convert(&z, ty.elem);
                    b.broadcast(&z, &ty.dims, &[])
                }
                Fill::Uniform { seed, scale } => {
                    // Each element's index in the whole tensor (one iota per axis; wrapping in
                    // u32 is fine for a hash), so the shards of any TP size make the same
                    // weights; hashed as the sampler hashes its noise.
                    let mut idx = b.constant_int(0, &ty.dims, Elem::U32);
                    let mut stride: u64 = 1;
                    for axis in (0..ty.dims.len()).rev() {
                        let io = b.iota(&ty.dims, axis as i64, Elem::U32);
                        let s = b.constant_int((stride & 0xFFFF_FFFF) as i64, &ty.dims, Elem::U32);
                        let term = b.mul(&io, &s);
                        idx = b.add(&idx, &term);
                        stride = stride.wrapping_mul(ty.dims[axis] as u64);
                    }
                    let keys = b.constant_int(seed as i64, &ty.dims, Elem::U32);
                    let u = uniform_hash(b, &keys, &idx, &ty.dims);
                    let k = b.constant_f32(2.0 * scale, &ty.dims);
                    let f = b.mul(&u, &k);
                    let off = b.constant_f32(scale, &ty.dims);
                    let f = b.sub(&f, &off);
                    b.convert(&f, ty.elem)
                }
            };
            let sh = (tp > 1).then(|| sharding.to_string());
            vec![(v, sh)]
        })
    }

    /// Compiles and runs the fill program once; returns each device's shard.
    pub fn run(
        client: &Client,
        devices: &[Device],
        ty: &Ty,
        sharding: &str,
        fill: Fill,
    ) -> Result<Vec<Buffer>, RunnerError> {
        let tp = devices.len();
        let no_args: Vec<Vec<&Buffer>> = vec![Vec::new(); tp];
        run_once(client, devices, &program(ty, sharding, tp, fill), &no_args)
    }
}

/// A zeroed KV cache `[layers × blocks, kv_heads, block_size, head_dim]` (the step program's
/// layout), sharded on the KV heads, made on the devices.
pub fn zero_cache(
    client: &Client,
    devices: &[Device],
    block_rows: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    elem: Elem,
) -> Result<Vec<Buffer>, RunnerError> {
    let dims = [block_rows, kv_heads, block_size, head_dim].map(|x| x as i64);
    let ty = Ty::new(&dims, elem);
    fill::run(
        client,
        devices,
        &ty,
        &arg_sharding(arg::K_CACHE, devices.len() as i64),
        Fill::Zeros,
    )
}

/// Peak and current resident memory of this process (kB from `/proc/self/status`), for the
/// start-up log; `None` off Linux.
pub fn rss_kb() -> Option<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmHWM:")?, field("RssAnon:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_rows_and_columns() {
        // [2, 4] of 2-byte elements numbered 0..8.
        let m: Vec<u8> = (0u16..8).flat_map(|v| v.to_le_bytes()).collect();
        let vals = |c: Cow<'_, [u8]>| -> Vec<u16> {
            c.chunks(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .collect()
        };
        assert_eq!(vals(shard(&m, 2, 4, 2, Split::Rows, 1, 2)), [4, 5, 6, 7]);
        assert_eq!(vals(shard(&m, 2, 4, 2, Split::Cols, 1, 2)), [2, 3, 6, 7]);
        assert!(matches!(
            shard(&m, 2, 4, 2, Split::Rows, 0, 2),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn conversion_rounds_like_half() {
        let vals = [1.0f32, -2.5, 3.140_625, 1e-8, 65504.0, 0.333_333_34];
        let t = HostTensor::from_f32(vec![vals.len()], vals.to_vec());
        let b = in_dtype(&t, DType::BF16);
        for (i, v) in vals.iter().enumerate() {
            let got = u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
            assert_eq!(got, bf16::from_f32(*v).to_bits());
        }
        assert!(matches!(in_dtype(&t, DType::F32), Cow::Borrowed(_)));
    }
}
