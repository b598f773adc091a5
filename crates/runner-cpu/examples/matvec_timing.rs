//! Times `matvec::matmul_wt` against candle's GEMM on SmolLM2's MLP down projection
//! (576 × 1536) for 1..64 rows: where the unpacked kernel stops paying off.
//! Run: `cargo run --release -p tpuserve-runner-cpu --example matvec_timing`.
use std::hint::black_box;
use std::time::Instant;

use candle_core::{Device, Tensor};

fn time(n: usize, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let (out, inner) = (576, 1536);
    let w: Vec<f32> = (0..out * inner).map(|i| (i % 97) as f32 * 1e-3).collect();
    let wt = Tensor::from_slice(&w, (out, inner), &Device::Cpu).unwrap();
    for rows in [1, 2, 4, 8, 16, 32, 64, 128, 256, 704] {
        let x: Vec<f32> = (0..rows * inner).map(|i| (i % 13) as f32 * 1e-2).collect();
        let ours = time(if rows > 64 { 20 } else { 200 }, || {
            black_box(tpuserve_runner_cpu::matvec::matmul_wt(
                &x, rows, &w, out, inner,
            ));
        });
        let gemm = time(if rows > 64 { 20 } else { 200 }, || {
            let xt = Tensor::from_slice(&x, (rows, inner), &Device::Cpu).unwrap();
            let y = xt.matmul(&wt.t().unwrap()).unwrap();
            black_box(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        });
        println!("rows {rows:2}: matvec {ours:8.1} us, candle gemm {gemm:8.1} us");
    }
}
