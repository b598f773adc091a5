//! What the TPU compiler's own per-kernel estimates add up to. An optimized TPU program (the
//! `hlo_with_config` proto `PJRT_Executable_OptimizedProgram` returns) carries, for every
//! kernel it will launch, the code generator's `estimated_cycles` in the instruction's
//! backend config. Unlike the cost analysis' `bytes accessed`, those know where each operand
//! lives (HBM or on-chip VMEM) and what a launch costs; and this walk multiplies a loop's
//! body by its trip count where the loop's bound is a constant (XLA's cost analysis counts
//! a body once), which is how a scatter the compiler turned into a loop of one row per
//! iteration shows its real price.
//!
//! Collectives carry no estimate: their payload bytes are summed for an ICI term.

use std::collections::HashMap;

/// A kernel estimate at or above this is the compiler's "unknown" (SparseCore offloads
/// report `i64::MAX`).
const UNKNOWN_CYCLES: u64 = 1 << 60;

/// The sums for one program, per device.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelSums {
    /// Σ estimated cycles of the kernels one execution launches.
    pub cycles: f64,
    /// Kernel launches (loop bodies × their trip counts).
    pub launches: f64,
    /// Payload bytes of the all-reduces one execution runs.
    pub all_reduce_bytes: f64,
    /// Bytes of each chip's share of the reduce-scatters (their outputs): an all-reduce's
    /// first half (sequence parallel: wo's and wd's sums, split by rows).
    pub reduce_scatter_bytes: f64,
    /// Bytes of the all-gathers' outputs (whole): an all-reduce's second half.
    pub all_gather_bytes: f64,
    /// Kernels whose estimate the compiler left unknown (SparseCore offloads).
    pub unknown: f64,
    /// One iteration (body and condition) of each loop whose bound is not a constant and
    /// that runs inside a loop whose bound is — in a step, the attention's KV-chunk loop,
    /// bounded by the step's longest context, inside the layer loop — as the loops around
    /// it repeat it. Counted once in `cycles` and `launches` as well.
    pub open_cycles: f64,
    pub open_launches: f64,
    /// The same for such loops not (yet) inside a constant-bound loop: in a step, the
    /// LM-head loop over chunks of logit rows, outside the layers.
    pub loose_cycles: f64,
    pub loose_launches: f64,
    /// `cycles` and `launches` with every conditional at its cheapest branch instead: in a
    /// step, the run where no row samples at random, asks for a filter, a token mask or
    /// prompt logprobs (greedy decode), where the full sums price every option on.
    pub plain_cycles: f64,
    pub plain_launches: f64,
}

impl KernelSums {
    /// `self + k × o`, field by field.
    pub fn add(&mut self, o: KernelSums, k: f64) {
        self.cycles += k * o.cycles;
        self.launches += k * o.launches;
        self.all_reduce_bytes += k * o.all_reduce_bytes;
        self.reduce_scatter_bytes += k * o.reduce_scatter_bytes;
        self.all_gather_bytes += k * o.all_gather_bytes;
        self.unknown += k * o.unknown;
        self.open_cycles += k * o.open_cycles;
        self.open_launches += k * o.open_launches;
        self.loose_cycles += k * o.loose_cycles;
        self.loose_launches += k * o.loose_launches;
        self.plain_cycles += k * o.plain_cycles;
        self.plain_launches += k * o.plain_launches;
    }
}

// --- a minimal protobuf reader: only the fields this walk needs ---

enum Field<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let c = *b.get(*i)?;
        *i += 1;
        v |= ((c & 0x7f) as u64) << shift;
        if c < 0x80 {
            return Some(v);
        }
    }
    None
}

fn fields(b: &[u8]) -> Option<Vec<(u32, Field<'_>)>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        let (num, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => out.push((num, Field::Int(varint(b, &mut i)?))),
            1 => i += 8,
            2 => {
                let n = varint(b, &mut i)? as usize;
                let s = b.get(i..i.checked_add(n)?)?;
                i += n;
                out.push((num, Field::Bytes(s)));
            }
            5 => i += 4,
            _ => return None,
        }
    }
    Some(out)
}

fn bytes_of<'a>(f: &[(u32, Field<'a>)], num: u32) -> Vec<&'a [u8]> {
    f.iter()
        .filter_map(|(n, v)| match v {
            Field::Bytes(b) if *n == num => Some(*b),
            _ => None,
        })
        .collect()
}

/// A repeated integer field, packed or not.
fn ints(f: &[(u32, Field<'_>)], num: u32) -> Vec<u64> {
    let mut out = Vec::new();
    for (n, v) in f {
        if *n != num {
            continue;
        }
        match v {
            Field::Int(x) => out.push(*x),
            Field::Bytes(b) => {
                let mut i = 0;
                while i < b.len() {
                    match varint(b, &mut i) {
                        Some(x) => out.push(x),
                        None => break,
                    }
                }
            }
        }
    }
    out
}

fn text<'a>(f: &[(u32, Field<'a>)], num: u32) -> &'a str {
    bytes_of(f, num)
        .first()
        .and_then(|b| std::str::from_utf8(b).ok())
        .unwrap_or("")
}

/// Bytes of a `ShapeProto` (tuples summed), from XLA's primitive type numbers.
/// The bytes of each array in a shape (one for an array, each element's for a tuple).
fn leaf_bytes(b: &[u8]) -> Vec<u64> {
    let Some(f) = fields(b) else { return vec![] };
    let tuple = bytes_of(&f, 4);
    if !tuple.is_empty() {
        return tuple.into_iter().flat_map(leaf_bytes).collect();
    }
    let size = match ints(&f, 2).first().copied().unwrap_or(0) {
        1 | 2 | 6 => 1,         // pred, s8, u8
        3 | 7 | 10 | 16 => 2,   // s16, u16, f16, bf16
        4 | 8 | 11 => 4,        // s32, u32, f32
        5 | 9 | 12 | 15 => 8,   // s64, u64, f64, c64
        18 => 16,               // c128
        19 | 20 | 23..=25 => 1, // f8 types
        _ => 0,
    };
    vec![size * ints(&f, 3).iter().product::<u64>()]
}

struct Inst {
    name: String,
    opcode: String,
    cycles: Option<u64>,
    called: Vec<u64>,
    out_bytes: u64,
    /// The smallest and the largest array of the output (an async collective's start
    /// returns its operand with its result).
    out_min: u64,
    out_max: u64,
    /// Scalar integer constants only.
    constant: Option<i64>,
    direction: String,
}

fn estimated_cycles(config: &[u8]) -> Option<u64> {
    let key = b"\"estimated_cycles\":\"";
    let at = config.windows(key.len()).position(|w| w == key)? + key.len();
    let digits: Vec<u8> = config[at..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn scalar_int(literal: &[u8]) -> Option<i64> {
    let f = fields(literal)?;
    // LiteralProto: s32s = 4, s64s = 5, u32s = 6, u64s = 7 (a scalar has one value). The
    // compiler's own loops (a windowed matmul's) count with u32.
    for (field, signed32) in [(4, true), (5, false), (6, false), (7, false)] {
        if let [x] = ints(&f, field).as_slice() {
            return Some(if signed32 {
                *x as i32 as i64
            } else {
                *x as i64
            });
        }
    }
    None
}

fn instruction(b: &[u8]) -> Option<Inst> {
    let f = fields(b)?;
    let config: Vec<u8> = bytes_of(&f, 43).concat();
    let out_leaves = bytes_of(&f, 3)
        .first()
        .map(|b| leaf_bytes(b))
        .unwrap_or_default();
    Some(Inst {
        name: text(&f, 1).to_string(),
        opcode: text(&f, 2).to_string(),
        cycles: estimated_cycles(&config),
        called: ints(&f, 38),
        out_bytes: out_leaves.iter().sum(),
        out_min: out_leaves.iter().copied().min().unwrap_or(0),
        out_max: out_leaves.iter().copied().max().unwrap_or(0),
        constant: bytes_of(&f, 8).first().and_then(|b| scalar_int(b)),
        direction: text(&f, 63).to_string(),
    })
}

/// The trip count of a loop whose condition is `counter < N` (or `<= N`) against a constant,
/// the counter starting at 0 and stepping by 1 (how the compiler writes the loops it makes
/// of scatters); `None` for any other condition (our own loops, bounded by step inputs).
fn trip_count(cond: &[Inst]) -> Option<f64> {
    let simple = cond.iter().all(|i| {
        matches!(
            i.opcode.as_str(),
            "parameter" | "get-tuple-element" | "constant" | "compare" | "copy"
        )
    });
    let compare = cond.iter().find(|i| i.opcode == "compare")?;
    let n = cond.iter().filter_map(|i| i.constant).next()?;
    if !simple || cond.iter().filter(|i| i.constant.is_some()).count() != 1 {
        return None;
    }
    match compare.direction.as_str() {
        "LT" => Some(n.max(0) as f64),
        "LE" => Some((n + 1).max(0) as f64),
        _ => None,
    }
}

/// Sums the kernel estimates of an optimized program (`hlo_with_config` or bare
/// `HloModuleProto` bytes) over one execution: the entry computation, loop bodies × their
/// trip counts where constant (else once, as XLA's cost analysis counts them), the
/// costliest branch of a conditional. Fused computations are not walked: a fusion is one
/// kernel and carries its own estimate.
pub fn kernel_sums(program: &[u8]) -> Result<KernelSums, String> {
    let (comps, entry) = module(program)?;
    let mut w = Walk {
        comps: &comps,
        memo: HashMap::new(),
        list: None,
    };
    Ok(w.walk(entry, 1.0, 0))
}

/// One kernel of an optimized program, as [`kernel_list`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    /// The instruction's name in the optimized module (e.g. `fusion.12`).
    pub name: String,
    pub opcode: String,
    /// The code generator's estimate for one launch.
    pub cycles: f64,
    /// Launches per execution (the trip counts of the loops around it).
    pub times: f64,
}

/// Every kernel [`kernel_sums`] counts, with its launches per execution, in program order:
/// which kernels a step's cycles go to.
pub fn kernel_list(program: &[u8]) -> Result<Vec<Kernel>, String> {
    let (comps, entry) = module(program)?;
    let mut w = Walk {
        comps: &comps,
        memo: HashMap::new(),
        list: Some(Vec::new()),
    };
    w.walk(entry, 1.0, 0);
    Ok(w.list.unwrap_or_default())
}

type Computations = HashMap<u64, Vec<Inst>>;

fn module(program: &[u8]) -> Result<(Computations, u64), String> {
    let top = fields(program).ok_or("not a protobuf")?;
    let module = match (bytes_of(&top, 1).first(), bytes_of(&top, 3).first()) {
        (Some(m), None) => fields(m).ok_or("bad HloModuleProto")?,
        _ => top,
    };
    let mut comps: Computations = HashMap::new();
    let mut by_name: HashMap<String, u64> = HashMap::new();
    for c in bytes_of(&module, 3) {
        let cf = fields(c).ok_or("bad HloComputationProto")?;
        let id = ints(&cf, 5)
            .first()
            .copied()
            .ok_or("computation without id")?;
        let insts = bytes_of(&cf, 2)
            .into_iter()
            .map(instruction)
            .collect::<Option<Vec<_>>>()
            .ok_or("bad HloInstructionProto")?;
        by_name.insert(text(&cf, 1).to_string(), id);
        comps.insert(id, insts);
    }
    let entry = ints(&module, 6)
        .first()
        .copied()
        .filter(|id| comps.contains_key(id))
        .or_else(|| by_name.get(text(&module, 2)).copied())
        .ok_or("no entry computation")?;
    Ok((comps, entry))
}

/// Adds the traffic of a collective held inside fusion `f` (one level down): an all-reduce
/// whose result the fusion slices (its output is smaller) is a reduce-scatter of the
/// fusion's output; otherwise the collective's own kind and bytes.
fn collective_in_fusion(comps: &Computations, f: &Inst, s: &mut KernelSums) {
    for c in &f.called {
        for i in comps.get(c).map(Vec::as_slice).unwrap_or_default() {
            match i.opcode.as_str() {
                "all-reduce" if f.out_max < i.out_bytes => {
                    s.reduce_scatter_bytes += f.out_min as f64
                }
                "all-reduce" => s.all_reduce_bytes += i.out_bytes as f64,
                "reduce-scatter" => s.reduce_scatter_bytes += i.out_min as f64,
                "all-gather" => s.all_gather_bytes += i.out_max as f64,
                _ => {}
            }
        }
    }
}

struct Walk<'a> {
    comps: &'a Computations,
    memo: HashMap<u64, KernelSums>,
    /// When listing, every kernel is recorded with its launches (and the memo is not read:
    /// a computation reached twice is listed twice).
    list: Option<Vec<Kernel>>,
}

impl Walk<'_> {
    /// The sums of computation `id`; `mult` is how often it runs (for the list).
    fn walk(&mut self, id: u64, mult: f64, depth: usize) -> KernelSums {
        if self.list.is_none() {
            if let Some(s) = self.memo.get(&id) {
                return *s;
            }
        }
        let comps = self.comps;
        let mut s = KernelSums::default();
        let Some(insts) = comps.get(&id) else {
            return s;
        };
        if depth > 64 {
            return s;
        }
        for i in insts {
            match i.opcode.as_str() {
                "fusion" => {
                    // The TPU compiler writes a sequence-parallel reduce-scatter as a fusion
                    // of an all-reduce and the dynamic-slice of this chip's rows
                    // (`all-reduce-scatter`), and may fuse other collectives likewise: the
                    // fusion's own estimate does not include their traffic.
                    collective_in_fusion(comps, i, &mut s);
                }
                "while" => {
                    // `[body, condition]` as the compiler writes them; the condition is the
                    // one whose root (last instruction) is not the carried tuple.
                    let (body, cond) = match i.called.as_slice() {
                        [a, b] => {
                            let root_is_tuple = |c: &u64| {
                                comps
                                    .get(c)
                                    .and_then(|x| x.last())
                                    .is_some_and(|x| x.opcode == "tuple")
                            };
                            if root_is_tuple(b) && !root_is_tuple(a) {
                                (*b, *a)
                            } else {
                                (*a, *b)
                            }
                        }
                        _ => continue,
                    };
                    let bound = comps.get(&cond).and_then(|c| trip_count(c));
                    let trips = bound.unwrap_or(1.0);
                    let b = self.walk(body, mult * trips, depth + 1);
                    let c = self.walk(cond, mult * (trips + 1.0), depth + 1);
                    // The loose loops of the body become open ones inside a bounded loop.
                    let mut b = b;
                    if bound.is_some() {
                        b.open_cycles += b.loose_cycles;
                        b.open_launches += b.loose_launches;
                        (b.loose_cycles, b.loose_launches) = (0.0, 0.0);
                    }
                    s.add(b, trips);
                    s.add(c, trips + 1.0);
                    if bound.is_none() {
                        s.loose_cycles += b.cycles + c.cycles;
                        s.loose_launches += b.launches + c.launches;
                    }
                }
                "conditional" => {
                    // Listed: every branch, as if it ran (the sums take the costliest, the
                    // plain sums the cheapest).
                    let mut worst: Option<KernelSums> = None;
                    let mut cheapest: Option<KernelSums> = None;
                    for &c in &i.called {
                        let b = self.walk(c, mult, depth + 1);
                        if worst.is_none_or(|w| b.cycles > w.cycles) {
                            worst = Some(b);
                        }
                        if cheapest.is_none_or(|w| b.plain_cycles < w.plain_cycles) {
                            cheapest = Some(b);
                        }
                    }
                    if let (Some(w), Some(c)) = (worst, cheapest) {
                        let mut both = w;
                        (both.plain_cycles, both.plain_launches) =
                            (c.plain_cycles, c.plain_launches);
                        s.add(both, 1.0);
                    }
                }
                "call" | "async-start" => {
                    for &c in &i.called {
                        let sub = self.walk(c, mult, depth + 1);
                        s.add(sub, 1.0);
                    }
                }
                "all-reduce" | "all-reduce-start" => s.all_reduce_bytes += i.out_bytes as f64,
                "reduce-scatter" | "reduce-scatter-start" => {
                    s.reduce_scatter_bytes += i.out_min as f64
                }
                "all-gather" | "all-gather-start" => s.all_gather_bytes += i.out_max as f64,
                _ => {}
            }
            match i.cycles {
                Some(c) if c >= UNKNOWN_CYCLES => s.unknown += 1.0,
                Some(c) => {
                    s.cycles += c as f64;
                    s.launches += 1.0;
                    s.plain_cycles += c as f64;
                    s.plain_launches += 1.0;
                    if let Some(list) = &mut self.list {
                        list.push(Kernel {
                            name: i.name.clone(),
                            opcode: i.opcode.clone(),
                            cycles: c as f64,
                            times: mult,
                        });
                    }
                }
                None => {}
            }
        }
        self.memo.insert(id, s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_varint(v: &mut Vec<u8>, mut x: u64) {
        while x >= 0x80 {
            v.push((x as u8) | 0x80);
            x >>= 7;
        }
        v.push(x as u8);
    }
    fn put_bytes(v: &mut Vec<u8>, num: u32, b: &[u8]) {
        put_varint(v, ((num as u64) << 3) | 2);
        put_varint(v, b.len() as u64);
        v.extend_from_slice(b);
    }
    fn put_int(v: &mut Vec<u8>, num: u32, x: u64) {
        put_varint(v, (num as u64) << 3);
        put_varint(v, x);
    }
    fn shape(elem: u64, dims: &[u64]) -> Vec<u8> {
        let mut v = Vec::new();
        put_int(&mut v, 2, elem);
        for &d in dims {
            put_int(&mut v, 3, d);
        }
        v
    }
    fn inst(opcode: &str, cycles: Option<u64>, called: &[u64], shp: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(&mut v, 2, opcode.as_bytes());
        put_bytes(&mut v, 3, shp);
        for &c in called {
            put_int(&mut v, 38, c);
        }
        if let Some(c) = cycles {
            let cfg = format!("{{\"window_config\":{{\"estimated_cycles\":\"{c}\"}}}}");
            put_bytes(&mut v, 43, cfg.as_bytes());
        }
        v
    }
    fn comp(id: u64, name: &str, insts: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        put_bytes(&mut v, 1, name.as_bytes());
        for i in insts {
            put_bytes(&mut v, 2, i);
        }
        put_int(&mut v, 5, id);
        v
    }

    /// The TPU compiler's sequence-parallel reduce-scatter: a fusion of an all-reduce of
    /// f32[16, 8] and this chip's slice f32[2, 8] of it; a fusion that keeps the whole
    /// all-reduce is an all-reduce; a fused all-gather of f32[16, 8]; a fusion holding
    /// only arithmetic moves nothing. Each fusion's own estimate counts as a kernel.
    #[test]
    fn collectives_inside_fusions_count_as_their_traffic() {
        let scalar = shape(4, &[]);
        let rs = comp(
            2,
            "all-reduce-scatter",
            &[
                inst("parameter", None, &[], &shape(11, &[16, 8])),
                inst("all-reduce", None, &[], &shape(11, &[16, 8])),
                inst("partition-id", None, &[], &scalar),
                inst("dynamic-slice", None, &[], &shape(11, &[2, 8])),
            ],
        );
        let ar = comp(
            3,
            "ar",
            &[inst("all-reduce", None, &[], &shape(11, &[16, 8]))],
        );
        let ag = comp(
            4,
            "ag",
            &[inst("all-gather", None, &[], &shape(11, &[16, 8]))],
        );
        let math = comp(5, "math", &[inst("multiply", None, &[], &scalar)]);
        let entry = comp(
            1,
            "main",
            &[
                inst("fusion", None, &[2], &shape(11, &[2, 8])),
                inst("fusion", Some(7), &[3], &shape(11, &[16, 8])),
                inst("fusion", None, &[4], &shape(11, &[16, 8])),
                inst("fusion", Some(3), &[5], &scalar),
            ],
        );
        let mut module = Vec::new();
        for c in [&rs, &ar, &ag, &math, &entry] {
            put_bytes(&mut module, 3, c);
        }
        put_int(&mut module, 6, 1);
        let s = kernel_sums(&module).unwrap();
        assert_eq!(s.reduce_scatter_bytes, 2.0 * 8.0 * 4.0);
        assert_eq!(s.all_reduce_bytes, 16.0 * 8.0 * 4.0);
        assert_eq!(s.all_gather_bytes, 16.0 * 8.0 * 4.0);
        assert_eq!((s.cycles, s.launches), (10.0, 2.0));
    }

    /// A loop bound held as u32 (the compiler's windowed-matmul loops) or s32, negative s32
    /// as written (sign-extended from its varint).
    #[test]
    fn scalar_constants_of_every_integer_kind() {
        for (field, value, want) in [(4u32, 7u64, 7i64), (5, 9, 9), (6, 4, 4), (7, 12, 12)] {
            let mut literal = Vec::new();
            put_int(&mut literal, field, value);
            assert_eq!(scalar_int(&literal), Some(want), "field {field}");
        }
        let mut literal = Vec::new();
        put_int(&mut literal, 4, (-3i32) as u32 as u64);
        assert_eq!(scalar_int(&literal), Some(-3));
        assert_eq!(scalar_int(&[]), None);
    }

    /// Entry: a kernel (100 cycles), an all-reduce of f32[4, 8], a loop `i < 7` whose body
    /// holds two kernels (10 + 20) and a fusion-internal computation that must not count, a
    /// conditional whose costlier branch is 50, an offloaded kernel of unknown cost, the
    /// same body in a loop of unknown bound, and that loop inside another `i < 7` loop.
    #[test]
    fn sums_kernels_loops_branches_and_all_reduces() {
        let scalar = shape(4, &[]);
        let mut literal = Vec::new();
        put_bytes(&mut literal, 1, &scalar);
        put_int(&mut literal, 4, 7);
        let mut constant = inst("constant", None, &[], &scalar);
        put_bytes(&mut constant, 8, &literal);
        let mut compare = inst("compare", None, &[], &shape(1, &[]));
        put_bytes(&mut compare, 63, b"LT");
        let cond = comp(
            2,
            "cond",
            &[
                inst("parameter", None, &[], &scalar),
                inst("get-tuple-element", None, &[], &scalar),
                constant,
                compare,
            ],
        );
        // A loop bounded by a carried value, not a constant (as the KV-chunk loop is).
        let mut open_compare = inst("compare", None, &[], &shape(1, &[]));
        put_bytes(&mut open_compare, 63, b"LT");
        let open_cond = comp(
            7,
            "open_cond",
            &[
                inst("parameter", None, &[], &scalar),
                inst("get-tuple-element", None, &[], &scalar),
                inst("get-tuple-element", None, &[], &scalar),
                open_compare,
            ],
        );
        let fused = comp(4, "fused", &[inst("multiply", Some(999), &[], &scalar)]);
        let body = comp(
            3,
            "body",
            &[
                inst("fusion", Some(10), &[4], &scalar),
                inst("copy", Some(20), &[], &scalar),
                inst("tuple", None, &[], &scalar),
            ],
        );
        // A bounded loop's body holding the open loop (the layer loop around the KV chunks).
        let outer = comp(
            8,
            "outer",
            &[
                inst("fusion", Some(10), &[4], &scalar),
                inst("while", None, &[7, 3], &scalar),
                inst("tuple", None, &[], &scalar),
            ],
        );
        let branch_a = comp(5, "a", &[inst("fusion", Some(50), &[4], &scalar)]);
        let branch_b = comp(6, "b", &[inst("fusion", Some(5), &[4], &scalar)]);
        let entry = comp(
            1,
            "main",
            &[
                inst("fusion", Some(100), &[4], &scalar),
                inst("all-reduce", None, &[], &shape(11, &[4, 8])),
                inst("while", None, &[2, 3], &scalar),
                inst("conditional", None, &[5, 6], &scalar),
                inst("fusion", Some(i64::MAX as u64), &[4], &scalar),
                inst("while", None, &[7, 3], &scalar),
                inst("while", None, &[2, 8], &scalar),
            ],
        );
        let mut module = Vec::new();
        for c in [
            &cond, &open_cond, &fused, &body, &outer, &branch_a, &branch_b, &entry,
        ] {
            put_bytes(&mut module, 3, c);
        }
        put_int(&mut module, 6, 1);
        let mut with_config = Vec::new();
        put_bytes(&mut with_config, 1, &module);

        let s = kernel_sums(&with_config).unwrap();
        // An open loop's body counts once per run, and on its own: loose at the top, open
        // inside the bounded loop, which runs it 7 times.
        assert_eq!(
            s.cycles,
            100.0 + 7.0 * 30.0 + 50.0 + 30.0 + 7.0 * (10.0 + 30.0)
        );
        assert_eq!(s.launches, 1.0 + 7.0 * 2.0 + 1.0 + 2.0 + 7.0 * 3.0);
        assert_eq!(s.all_reduce_bytes, 4.0 * 8.0 * 4.0);
        assert_eq!(s.unknown, 1.0);
        assert_eq!((s.loose_cycles, s.loose_launches), (30.0, 2.0));
        assert_eq!((s.open_cycles, s.open_launches), (7.0 * 30.0, 7.0 * 2.0));
        // The plain sums take the conditional's cheapest branch.
        assert_eq!(s.plain_cycles, s.cycles - 50.0 + 5.0);
        assert_eq!(s.plain_launches, s.launches);
        // The bare module reads the same.
        assert_eq!(kernel_sums(&module).unwrap(), s);
        assert!(kernel_sums(b"\xff\xff\xff").is_err());

        // The list: each kernel once with its launches, both branches listed.
        let list = kernel_list(&with_config).unwrap();
        let got: Vec<(f64, f64)> = list.iter().map(|k| (k.cycles, k.times)).collect();
        assert_eq!(
            got,
            [
                (100.0, 1.0),
                (10.0, 7.0),
                (20.0, 7.0),
                (50.0, 1.0),
                (5.0, 1.0),
                (10.0, 1.0),
                (20.0, 1.0),
                (10.0, 7.0),
                (10.0, 7.0),
                (20.0, 7.0)
            ]
        );
        assert_eq!(list[2].opcode, "copy");
    }
}
