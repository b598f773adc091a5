//! Prints the TPU compiler's per-kernel estimates summed over optimized programs, e.g. the
//! `--dump-hlo` files of `tpuserve plan --cost`:
//! `cargo run --release -p tpuserve-runner-xla --example kernel_sums -- [--top N] DIR/*.hlo.pb`.
//! With `--top N`, also each program's N costliest kernels (cycles × launches).

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut top = 0;
    if let Some(at) = args.iter().position(|a| a == "--top") {
        top = args.get(at + 1).and_then(|n| n.parse().ok()).unwrap_or(20);
        args.drain(at..(at + 2).min(args.len()));
    }
    for path in args {
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                println!("{path}: {e}");
                continue;
            }
        };
        match tpuserve_runner_xla::kernels::kernel_sums(&bytes) {
            Ok(s) => println!(
                "{path}: {:.0} cycles, {:.0} launches, all-reduce {:.2} MB, reduce-scatter \
                 outputs {:.2} MB, all-gather outputs {:.2} MB, {:.0} unknown",
                s.cycles,
                s.launches,
                s.all_reduce_bytes / 1e6,
                s.reduce_scatter_bytes / 1e6,
                s.all_gather_bytes / 1e6,
                s.unknown
            ),
            Err(e) => println!("{path}: {e}"),
        }
        if top == 0 {
            continue;
        }
        let Ok(mut list) = tpuserve_runner_xla::kernels::kernel_list(&bytes) else {
            continue;
        };
        list.sort_by(|a, b| (b.cycles * b.times).total_cmp(&(a.cycles * a.times)));
        for k in list.iter().take(top) {
            println!(
                "  {:>12.0} = {:>9.0} × {:<6} {:<14} {}",
                k.cycles * k.times,
                k.cycles,
                k.times,
                k.opcode,
                k.name
            );
        }
    }
}
