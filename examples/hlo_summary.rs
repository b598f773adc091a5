//! Lists the large arrays of a compiled program: `cargo run --release --example hlo_summary --
//! FILE.hlo.pb [MIN_ELEMENTS]` on an `hlo_with_config` dump (`tpuserve plan --cost
//! --dump-hlo`, or `PJRT_Executable_OptimizedProgram`): every instruction with an array of at
//! least MIN_ELEMENTS (default 1M) elements, with its opcode, name and shapes, and a count per
//! opcode. How to see what the compiler made of a step: which copies, gathers or collectives
//! move a weight or the KV cache.

use std::collections::BTreeMap;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: hlo_summary FILE.hlo.pb [MIN_ELEMENTS]");
        std::process::exit(2);
    };
    let min: i64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let code = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let insts = tpuserve_suite::hlo_proto::instructions(&code);
    let mut per_op: BTreeMap<&str, usize> = BTreeMap::new();
    for i in &insts {
        if i.largest() >= min {
            *per_op.entry(i.opcode.as_str()).or_default() += 1;
            println!("{:<20} {:<40} {:?}", i.opcode, i.name, i.shapes);
        }
    }
    println!(
        "{} instructions, {} with an array of >= {min} elements:",
        insts.len(),
        per_op.values().sum::<usize>()
    );
    for (op, n) in per_op {
        println!("  {op:<20} {n}");
    }
}
