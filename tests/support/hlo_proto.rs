//! Reads instructions out of a serialized optimized XLA module (`hlo_with_config`, what
//! `PJRT_Executable_OptimizedProgram` returns): opcode and result shape of every instruction,
//! enough to check what GSPMD made of a program (collectives, copies) without protobuf
//! definitions. Field numbers from XLA's `hlo.proto` / `xla_data.proto`:
//! `HloModuleProtoWithConfig.hlo_module = 1`, `HloModuleProto.computations = 3`,
//! `HloComputationProto.instructions = 2`, `HloInstructionProto.{name = 1, opcode = 2,
//! shape = 3}`, `ShapeProto.{dimensions = 3, tuple_shapes = 4}`.

#[derive(Debug, Clone)]
pub struct Instruction {
    pub name: String,
    pub opcode: String,
    /// Dimensions of the result, one list per array (a tuple result has several).
    pub shapes: Vec<Vec<i64>>,
}

impl Instruction {
    /// Elements of the largest array in the result.
    pub fn largest(&self) -> i64 {
        self.shapes
            .iter()
            .map(|d| d.iter().product::<i64>())
            .max()
            .unwrap_or(0)
    }
}

/// Every instruction of every computation of the module.
pub fn instructions(with_config: &[u8]) -> Vec<Instruction> {
    let mut out = Vec::new();
    for module in fields(with_config, 1) {
        for comp in fields(module, 3) {
            for inst in fields(comp, 2) {
                let text = |n| {
                    fields(inst, n)
                        .first()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default()
                };
                let mut shapes = Vec::new();
                if let Some(shape) = fields(inst, 3).first() {
                    collect_shapes(shape, &mut shapes);
                }
                out.push(Instruction {
                    name: text(1),
                    opcode: text(2),
                    shapes,
                });
            }
        }
    }
    out
}

fn collect_shapes(shape: &[u8], out: &mut Vec<Vec<i64>>) {
    let tuple = fields(shape, 4);
    if tuple.is_empty() {
        out.push(packed_ints(shape, 3));
    }
    for t in tuple {
        collect_shapes(t, out);
    }
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// (field number, wire type, payload) of each top-level field; stops at malformed data.
fn walk(buf: &[u8]) -> Vec<(u64, u64, &[u8], u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let Some(key) = varint(buf, &mut pos) else {
            break;
        };
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let Some(v) = varint(buf, &mut pos) else {
                    break;
                };
                out.push((field, wire, &buf[0..0], v));
            }
            1 => pos += 8,
            5 => pos += 4,
            2 => {
                let Some(len) = varint(buf, &mut pos) else {
                    break;
                };
                let end = pos + len as usize;
                if end > buf.len() {
                    break;
                }
                out.push((field, wire, &buf[pos..end], 0));
                pos = end;
            }
            _ => break,
        }
    }
    out
}

/// The length-delimited payloads of field `n`.
fn fields(buf: &[u8], n: u64) -> Vec<&[u8]> {
    walk(buf)
        .into_iter()
        .filter(|(f, w, _, _)| *f == n && *w == 2)
        .map(|(_, _, b, _)| b)
        .collect()
}

/// Field `n` as int64s, packed or not.
fn packed_ints(buf: &[u8], n: u64) -> Vec<i64> {
    let mut out = Vec::new();
    for (f, w, b, v) in walk(buf) {
        if f != n {
            continue;
        }
        if w == 0 {
            out.push(v as i64);
        } else if w == 2 {
            let mut pos = 0;
            while let Some(x) = varint(b, &mut pos) {
                out.push(x as i64);
            }
        }
    }
    out
}

/// Opcodes that move data between devices or copy an array: none of them may touch the KV
/// cache in a step program.
pub const MOVES: &[&str] = &[
    "all-gather",
    "all-to-all",
    "collective-permute",
    "all-reduce",
    "reduce-scatter",
    "copy",
    "copy-start",
];
