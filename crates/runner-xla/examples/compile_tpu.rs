//! Compiles a StableHLO module (text, e.g. one `jax.jit(...).lower(...)` wrote) for a TPU
//! topology without a TPU and prints what the compiler says of it: cost analysis, memory and
//! the code generator's per-kernel estimates. libtpu is only loaded inside a network namespace
//! with no interfaces and the metadata query switched off, as `tpuserve plan --cost` runs it:
//! `unshare -n env TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v6e-8 TPU_WORKER_ID=0
//! TPU_WORKER_HOSTNAMES=localhost TPU_HOST_BOUNDS=1,1,1 TPU_CHIPS_PER_HOST_BOUNDS=2,4,1
//! target/release/examples/compile_tpu v6e:2x4 FILE.mlir [--dump OUT.hlo.pb] [--spmd N]`
//! (`--spmd N`: SPMD-partitioned over N chips, as the step programs at TP N).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (topology, file) = match (args.first(), args.get(1)) {
        (Some(t), Some(f)) => (t.clone(), f.clone()),
        _ => {
            return Err(
                "usage: compile_tpu TOPOLOGY FILE.mlir [--dump OUT.hlo.pb] [--spmd N]".into(),
            )
        }
    };
    let dump = args
        .iter()
        .position(|a| a == "--dump")
        .and_then(|i| args.get(i + 1));
    let options = match args.iter().position(|a| a == "--spmd") {
        Some(i) => tpuserve_pjrt::CompileOptions::spmd(
            args.get(i + 1)
                .ok_or("--spmd takes a chip count")?
                .parse()?,
        ),
        None => tpuserve_pjrt::CompileOptions::default(),
    };
    let text = std::fs::read_to_string(&file)?;
    let topo = tpuserve_runner_xla::deviceless::open_topology(&topology)?;
    let t = std::time::Instant::now();
    let exe = topo.compile(&text, &options)?;
    println!(
        "{file}: compiled for {topology} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for name in ["flops", "bytes accessed", "optimal_seconds"] {
        println!("  {name}: {:?}", exe.cost(name)?);
    }
    println!("  memory: {:?}", exe.memory_stats()?);
    let code = exe.optimized_program()?.code;
    if let Some(out) = dump {
        std::fs::write(out, &code)?;
    }
    let s = tpuserve_runner_xla::kernels::kernel_sums(&code)?;
    println!(
        "  kernels: {:.0} cycles, {:.0} launches, {:.0} unknown",
        s.cycles, s.launches, s.unknown
    );
    Ok(())
}
