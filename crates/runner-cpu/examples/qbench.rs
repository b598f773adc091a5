//! Micro-benchmark of the decode matmuls at SmolLM2-135M shapes (Q4_1 layers, Q8_0 LM head)
//! at 1, 8, 32 and 64 rows per kernel, against the f32 kernel on same-shaped weights:
//! `cargo run --release -p tpuserve-runner-cpu --example qbench` (`QISA=Avx2` picks one;
//! `QROWS=32` one row count, without the f32 kernel, e.g. under `perf`; `QTYPES=1` instead
//! times one 3072 × 512 matrix in each block type, K-quants beside the others; `QTYPE=Q4_1`
//! only one of them, e.g. under `perf annotate`).

use std::time::Instant;
use tpuserve_runner_cpu::matvec::matmul_wt;
use tpuserve_runner_cpu::qmatvec::*;

fn main() {
    let shapes = [
        (960usize, 576usize, QType::Q4_1),
        (576, 576, QType::Q4_1),
        (3072, 576, QType::Q4_1),
        (576, 1536, QType::Q4_1),
        (49152, 576, QType::Q8_0),
    ];
    let only: Option<usize> = std::env::var("QROWS").ok().and_then(|v| v.parse().ok());
    if std::env::var("QTYPES").is_ok() {
        types(only);
        return;
    }
    for rows in [1usize, 8, 32, 64]
        .into_iter()
        .filter(|r| only.is_none_or(|o| o == *r))
    {
        for isa in available_isas()
            .into_iter()
            .filter(|i| std::env::var("QISA").map_or(true, |v| format!("{i:?}") == v))
        {
            let mut tot = 0f64;
            for &(out, inner, ty) in &shapes {
                let w = QMatrix::new(
                    ty,
                    out,
                    inner,
                    (0..out * inner / 32 * ty.block_bytes())
                        .map(|i| (i * 7 % 251) as u8 & 0x3f)
                        .collect(),
                )
                .unwrap();
                let x: Vec<f32> = (0..rows * inner).map(|i| (i % 13) as f32 - 6.0).collect();
                let reps = if out > 10000 { 20 } else { 200 } * if only.is_some() { 10 } else { 1 };
                let _ = qmatmul_wt_with(isa, &x, rows, &w);
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(qmatmul_wt_with(isa, &x, rows, &w));
                }
                let us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
                let per_model = if out > 10000 { us } else { us * 30.0 };
                tot += per_model;
                println!("rows {rows} {isa:?} {out}x{inner} {ty:?}: {us:.1} us  (x model {per_model:.0})");
            }
            println!("rows {rows} {isa:?} total per step {:.2} ms", tot / 1000.0);
        }
        if only.is_some() {
            continue;
        }
        let mut tot = 0f64;
        for &(out, inner, _) in &shapes {
            let w: Vec<f32> = (0..out * inner).map(|i| (i % 17) as f32).collect();
            let x: Vec<f32> = (0..rows * inner).map(|i| (i % 13) as f32 - 6.0).collect();
            let reps = if out > 10000 { 10 } else { 100 };
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(matmul_wt(&x, rows, &w, out, inner));
            }
            let us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
            tot += if out > 10000 { us } else { us * 30.0 };
        }
        println!("rows {rows} f32 total per step {:.2} ms", tot / 1000.0);
    }
}

/// One 3072 × 512 matrix per block type, every kernel, at `only` rows (else 32 and 64).
fn types(only: Option<usize>) {
    let (out, inner) = (3072usize, 512usize);
    for rows in [32usize, 64]
        .into_iter()
        .filter(|r| only.is_none_or(|o| o == *r))
    {
        for isa in available_isas()
            .into_iter()
            .filter(|i| std::env::var("QISA").map_or(true, |v| format!("{i:?}") == v))
        {
            for ty in [
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
            ]
            .into_iter()
            .filter(|t| std::env::var("QTYPE").map_or(true, |v| format!("{t:?}") == v))
            {
                // Random blocks whose f16 scales are small normal numbers.
                let bytes = (out * inner / ty.block_values()) * ty.block_bytes();
                let w = QMatrix::new(
                    ty,
                    out,
                    inner,
                    (0..bytes).map(|i| (i * 7 % 251) as u8 & 0x1f).collect(),
                )
                .unwrap();
                let x: Vec<f32> = (0..rows * inner).map(|i| (i % 13) as f32 - 6.0).collect();
                let _ = qmatmul_wt_with(isa, &x, rows, &w);
                let reps = 200;
                let t = Instant::now();
                for _ in 0..reps {
                    std::hint::black_box(qmatmul_wt_with(isa, &x, rows, &w));
                }
                let us = t.elapsed().as_secs_f64() / reps as f64 * 1e6;
                let gmac = (rows * out * inner) as f64 / us / 1e3;
                println!("rows {rows} {isa:?} {out}x{inner} {ty:?}: {us:.1} us ({gmac:.0} GMAC/s)");
            }
        }
    }
}
