//! The TPU compiler's own view of our step programs without a TPU: libtpu compiles for a
//! topology such as `v6e:2x4` on any machine (`PJRT_TopologyDescription_Create` →
//! `PJRT_Compile`), and reports per device the flops, bytes, `optimal_seconds` of its cost
//! model and the argument / temporary bytes of the compiled program. That proves every bucket
//! compiles and fits on the chip before the first GKE start, and shows what a step costs.
//!
//! Network safety: libtpu, started on a machine that is not a TPU VM, queries the cloud
//! metadata server. Deviceless work therefore runs only inside a network namespace with no
//! interface but loopback (`unshare -n`) and with the metadata query switched off
//! (`TPU_SKIP_MDS_QUERY=1` and the topology given in the environment); [`open_topology`]
//! checks both and refuses otherwise. `tpuserve plan --cost` re-runs itself that way.

use std::time::Instant;

pub use tpuserve_pjrt::Topology;
use tpuserve_pjrt::{MemoryStats, NamedValue, Plugin};
use tpuserve_runner_api::RunnerError;

use crate::device::{self, DeviceKind};
use crate::kernels::KernelSums;
use crate::program::{Bucket, ProgramConfig, Unroll};

fn derr(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Device(e.to_string())
}

/// Network interfaces other than loopback in this process's network namespace (from
/// `/proc/self/net/dev`; `/sys/class/net` shows the namespace sysfs was mounted in, not
/// ours). Empty inside `unshare -n`.
pub fn network_interfaces() -> Vec<String> {
    let Ok(text) = std::fs::read_to_string("/proc/self/net/dev") else {
        return vec!["(cannot read /proc/self/net/dev)".into()];
    };
    let mut v: Vec<String> = text
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .filter(|n| n != "lo")
        .collect();
    v.sort();
    v
}

/// The environment libtpu needs to start for `topology` (`v6e:AxB`) without asking the
/// metadata server: one host holding all A × B chips.
pub fn tpu_env(topology: &str) -> Result<Vec<(&'static str, String)>, RunnerError> {
    let bad = || derr(format!("topology `{topology}` is not of the form v6e:AxB"));
    let (gen, shape) = topology.split_once(':').ok_or_else(bad)?;
    let (a, b) = shape.split_once('x').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    Ok(vec![
        ("TPU_SKIP_MDS_QUERY", "1".into()),
        ("TPU_ACCELERATOR_TYPE", format!("{gen}-{}", a * b)),
        ("TPU_WORKER_ID", "0".into()),
        ("TPU_WORKER_HOSTNAMES", "localhost".into()),
        ("TPU_HOST_BOUNDS", "1,1,1".into()),
        ("TPU_CHIPS_PER_HOST_BOUNDS", format!("{a},{b},1")),
    ])
}

/// Loads libtpu and creates `topology`, refusing unless this process is network-isolated
/// and has the metadata query switched off.
pub fn open_topology(topology: &str) -> Result<Topology, RunnerError> {
    let ifaces = network_interfaces();
    if !ifaces.is_empty() {
        return Err(derr(format!(
            "refusing to load libtpu without a TPU: network interfaces {ifaces:?} are up and \
             libtpu would query the cloud metadata server; run inside `unshare -n` \
             (`tpuserve plan --cost` does so itself)"
        )));
    }
    for (k, v) in tpu_env(topology)? {
        if std::env::var(k).ok().as_deref() != Some(v.as_str()) {
            return Err(derr(format!(
                "refusing to load libtpu without a TPU: {k} must be `{v}` for {topology}"
            )));
        }
    }
    let path = device::plugin_path(&DeviceKind::Tpu).map_err(derr)?;
    let plugin = Plugin::load(&path).map_err(derr)?;
    Topology::create(&plugin, topology, &[] as &[(&str, NamedValue)]).map_err(derr)
}

/// What the TPU compiler says of one step program, per device.
#[derive(Debug, Clone)]
pub struct ProgramCost {
    pub bucket: Bucket,
    pub flops: f64,
    pub bytes_accessed: f64,
    pub optimal_seconds: f64,
    /// The code generator's per-kernel estimates, of the same program as the flops.
    pub kernels: KernelSums,
    pub memory: MemoryStats,
    pub compile_seconds: f64,
    /// The optimized, partitioned program (`hlo_with_config` bytes).
    pub optimized: Vec<u8>,
    /// The compiler offloaded a gather to the SparseCores; the cost figures are then the
    /// same program's without offload.
    pub gather_offloaded: bool,
}

/// The compiler's figures for one program, per device: its cost analysis' three, and its
/// code generator's per-kernel cycle estimates summed (see [`crate::kernels`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Figures {
    pub flops: f64,
    pub bytes: f64,
    pub optimal_seconds: f64,
    pub kernels: KernelSums,
}

impl Figures {
    pub fn plus(self, o: Figures, k: f64) -> Figures {
        let mut kernels = self.kernels;
        kernels.add(o.kernels, k);
        Figures {
            flops: self.flops + k * o.flops,
            bytes: self.bytes + k * o.bytes,
            optimal_seconds: self.optimal_seconds + k * o.optimal_seconds,
            kernels,
        }
    }
}

/// The TPU's clock as the compiler's cycle estimates imply it: cycles per second at which its
/// estimate for a weight-streaming matmul (16 rows × a 256 MB bf16 matrix, what a decode
/// step's dots are) takes bytes / HBM bandwidth (`hbm`), and at which a large bf16 matmul
/// takes flops / peak flops (`mxu`). How far apart the two are says how far the cycle counts
/// and the chip's published figures agree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clock {
    pub hbm_hz: f64,
    pub mxu_hz: f64,
}

/// Compiles two probe matmuls for the topology (`[16, 8192] · [8192, 16384]` and
/// `[8192, 8192] · [8192, 8192]`, bf16) and reads their cycle estimates; `bandwidth` and
/// `peak_flops` are the chip's published HBM bytes/s and bf16 flop/s.
pub fn clock(topology: &Topology, bandwidth: f64, peak_flops: f64) -> Result<Clock, RunnerError> {
    use crate::hlo::{module, Arg, Elem, Ty};
    let cycles = |text: String| -> Result<f64, RunnerError> {
        let exe = topology
            .compile(&text, &crate::compile_options(1, "tpu"))
            .map_err(|e| derr(format!("compiling a clock probe for TPU: {e}")))?;
        let code = exe.optimized_program().map_err(derr)?.code;
        let s = crate::kernels::kernel_sums(&code).map_err(derr)?;
        if s.cycles > 0.0 {
            Ok(s.cycles)
        } else {
            Err(derr(
                "the TPU compiler gave a clock probe no cycle estimate",
            ))
        }
    };
    let arg = |dims: &[i64]| Arg {
        ty: Ty::new(dims, Elem::BF16),
        attrs: vec![],
    };
    let matmul = |name: &str, rows: i64, k: i64, n: i64| {
        module(name, 1, &[arg(&[rows, k]), arg(&[k, n])], |b, v| {
            let y = b.dot_general(&v[0], &v[1], (&[], &[]), (&[1], &[0]), Elem::BF16);
            vec![(y, None)]
        })
    };
    let (k, n, m) = (8192i64, 16384i64, 8192i64);
    let stream = matmul("clock_hbm", 16, k, n);
    let mxu = matmul("clock_mxu", m, m, m);
    let stream_bytes = 2.0 * (k * n + 16 * (k + n)) as f64;
    let mxu_flops = 2.0 * (m as f64).powi(3);
    Ok(Clock {
        hbm_hz: cycles(stream)? / (stream_bytes / bandwidth),
        mxu_hz: cycles(mxu)? / (mxu_flops / peak_flops),
    })
}

/// A step's cost in parts, from straight-line variants of its program (XLA's cost analysis
/// counts a `while` body once): everything outside the layers, one layer with one KV
/// chunk, and each further chunk.
#[derive(Debug, Clone, Copy)]
pub struct StepParts {
    pub outside: Figures,
    pub layer: Figures,
    pub chunk: Figures,
}

impl StepParts {
    /// The step with `layers` layers reading `chunks` KV chunks each.
    pub fn step(&self, layers: i64, chunks: i64) -> Figures {
        let per_layer = self.layer.plus(self.chunk, (chunks.max(1) - 1) as f64);
        self.outside.plus(per_layer, layers as f64)
    }
}

/// The TPU compiler hands big gathers (the attention's pages, from about 2,048 indices) to the
/// SparseCores, and its cost analysis charges such an offloaded gather its whole table, the
/// KV cache (tens of GB), whatever it reads. Programs compiled for the cost figures keep the
/// gather on the TensorCore, where it is charged the pages it reads; HBM traffic is the same
/// either way (pages read, written, read again by the dots).
fn without_gather_offload(tp: i64) -> tpuserve_pjrt::CompileOptions {
    let mut options = crate::compile_options(tp, "tpu");
    options.env_option_overrides.push((
        "xla_tpu_offload_gather_to_sparsecore".into(),
        tpuserve_pjrt::OptionOverride::Bool(false),
    ));
    options
}

/// Whether an optimized program (`hlo_with_config` bytes) holds a gather offloaded to the
/// SparseCores (the compiler names those fusions `gather_offload…`).
fn has_gather_offload(optimized: &[u8]) -> bool {
    optimized.windows(14).any(|w| w == b"gather_offload")
}

/// Compiles the layers without the tail as (1 layer, 1 chunk), (2 layers, 1 chunk) and
/// (1 layer, 2 chunks) and takes differences; the rest of the step is the tail (embedding,
/// final norm, LM head, sampling) compiled with no layer, plus what the layer-only variants
/// hold outside their layers.
/// With `dump`, each variant's optimized program is written there
/// (`parts-t{tokens}-r{tile}-l{layers}-c{chunks}[-tail].hlo.pb`).
/// `whole`: the kernel sums of the step's own program for `bucket` when the caller has
/// them already ([`ProgramCost::kernels`]); that program is compiled here otherwise.
pub fn step_parts(
    topology: &Topology,
    cfg: &ProgramConfig,
    bucket: Bucket,
    whole: Option<KernelSums>,
    dump: Option<&std::path::Path>,
) -> Result<StepParts, RunnerError> {
    let options = without_gather_offload(cfg.tp);
    let figures = |u: Unroll| -> Result<Figures, RunnerError> {
        let text = cfg.emit_unrolled(bucket, u);
        let exe = topology
            .compile(&text, &options)
            .map_err(|e| derr(format!("compiling {bucket:?} {u:?} for TPU: {e}")))?;
        let code = exe.optimized_program().map_err(derr)?.code;
        if let Some(dir) = dump {
            let path = dir.join(format!(
                "parts-t{}-r{}-l{}-c{}{}.hlo.pb",
                bucket.tokens,
                bucket.tile,
                u.layers,
                u.chunks,
                if u.tail { "-tail" } else { "" }
            ));
            std::fs::write(&path, &code)
                .map_err(|e| derr(format!("writing {}: {e}", path.display())))?;
        }
        let f = |name: &str| -> Result<f64, RunnerError> {
            Ok(exe.cost(name).map_err(derr)?.unwrap_or(f64::NAN))
        };
        Ok(Figures {
            flops: f("flops")?,
            bytes: f("bytes accessed")?,
            optimal_seconds: f("optimal_seconds")?,
            kernels: crate::kernels::kernel_sums(&code).map_err(derr)?,
        })
    };
    let layers = |layers, chunks| Unroll {
        layers,
        chunks,
        tail: false,
    };
    let (c11, c21, c12) = (
        figures(layers(1, 1))?,
        figures(layers(2, 1))?,
        figures(layers(1, 2))?,
    );
    let tail = figures(Unroll {
        layers: 0,
        chunks: 1,
        tail: true,
    })?;
    let mut layer = c21.plus(c11, -1.0);
    let outside = tail.plus(c11, 1.0).plus(layer, -1.0);
    let mut chunk = c12.plus(c11, -1.0);
    // The kernels of a layer and of a chunk come from the program that runs: straight-line
    // layers are scheduled differently from the loops' bodies (unrolled, the compiler copied
    // a layer's Q matrix out of the stack where the loop's dot reads it in place; a second
    // straight-line chunk came out cheaper than none at 70B, 32 rows). The kernel sums count
    // the layer loop (a constant bound) its trip count times and give the KV-chunk loop's
    // body on its own (`open_*`: its bound is the step's context), counting that loop's body
    // once per layer. So the step's own program is compiled too: a chunk is one more trip of
    // that body, and a layer — its first chunk included — is what the program holds beyond
    // the rest, split evenly over its layers; `step(layers, 1)` is the program's estimate.
    let whole = match whole {
        Some(w) => w,
        None => {
            let exe = topology
                .compile(&cfg.emit(bucket), &options)
                .map_err(|e| derr(format!("compiling {bucket:?} for TPU: {e}")))?;
            crate::kernels::kernel_sums(&exe.optimized_program().map_err(derr)?.code)
                .map_err(derr)?
        }
    };
    let n = cfg.dims.layers.max(1) as f64;
    // The chunk loop's body holds no conditional: its plain sums are its sums.
    chunk.kernels = KernelSums {
        cycles: whole.open_cycles / n,
        launches: whole.open_launches / n,
        plain_cycles: whole.open_cycles / n,
        plain_launches: whole.open_launches / n,
        ..KernelSums::default()
    };
    let mut per_layer = whole;
    per_layer.add(outside.kernels, -1.0);
    let mut k = KernelSums::default();
    k.add(per_layer, 1.0 / n);
    (k.open_cycles, k.open_launches) = (0.0, 0.0);
    (k.loose_cycles, k.loose_launches) = (0.0, 0.0);
    layer.kernels = k;
    Ok(StepParts {
        outside,
        layer,
        chunk,
    })
}

/// Compiles `cfg`'s program for `bucket` for the topology and reads the compiler's figures:
/// memory from the program as it would run; flops, bytes and `optimal_seconds` from the same
/// program compiled without SparseCore gather offload when the compiler offloaded a gather
/// (see [`without_gather_offload`]).
pub fn program_cost(
    topology: &Topology,
    cfg: &ProgramConfig,
    bucket: Bucket,
) -> Result<ProgramCost, RunnerError> {
    let t = Instant::now();
    let text = cfg.emit(bucket);
    let compile = |options: &tpuserve_pjrt::CompileOptions| {
        topology
            .compile(&text, options)
            .map_err(|e| derr(format!("compiling {bucket:?} for TPU: {e}")))
    };
    let exe = compile(&crate::compile_options(cfg.tp, "tpu"))?;
    let compile_seconds = t.elapsed().as_secs_f64();
    let optimized = exe.optimized_program().map_err(derr)?.code;
    let gather_offloaded = has_gather_offload(&optimized);
    let without;
    let costed = if gather_offloaded {
        without = compile(&without_gather_offload(cfg.tp))?;
        &without
    } else {
        &exe
    };
    let figure = |name: &str| -> Result<f64, RunnerError> {
        Ok(costed.cost(name).map_err(derr)?.unwrap_or(f64::NAN))
    };
    Ok(ProgramCost {
        bucket,
        flops: figure("flops")?,
        bytes_accessed: figure("bytes accessed")?,
        optimal_seconds: figure("optimal_seconds")?,
        kernels: crate::kernels::kernel_sums(&costed.optimized_program().map_err(derr)?.code)
            .map_err(derr)?,
        memory: exe.memory_stats().map_err(derr)?,
        compile_seconds,
        optimized,
        gather_offloaded,
    })
}
