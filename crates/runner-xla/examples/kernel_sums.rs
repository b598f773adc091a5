//! Prints the TPU compiler's per-kernel estimates summed over optimized programs, e.g. the
//! `--dump-hlo` files of `tpuserve plan --cost`:
//! `cargo run --release -p tpuserve-runner-xla --example kernel_sums -- DIR/*.hlo.pb`.

fn main() {
    for path in std::env::args().skip(1) {
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| tpuserve_runner_xla::kernels::kernel_sums(&b))
        {
            Ok(s) => println!(
                "{path}: {:.0} cycles, {:.0} launches, all-reduce {:.2} MB, {:.0} unknown",
                s.cycles,
                s.launches,
                s.all_reduce_bytes / 1e6,
                s.unknown
            ),
            Err(e) => println!("{path}: {e}"),
        }
    }
}
