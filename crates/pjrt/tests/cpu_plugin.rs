//! End-to-end tests against the XLA CPU PJRT plugin.
//!
//! These FAIL (they do not skip) when the plugin is missing: install it with scripts/setup.sh,
//! or point TPUSERVE_PJRT_CPU_PLUGIN at pjrt_c_api_cpu_plugin.so.

use tpuserve_pjrt::{
    find_cpu_plugin, AlignedBytes, Buffer, Client, CompileOptions, ElementType, Error,
    ExecuteOptions, NamedValue, Plugin,
};

fn plugin() -> Plugin {
    let path = find_cpu_plugin().unwrap_or_else(|| {
        panic!(
            "the XLA CPU PJRT plugin (pjrt_c_api_cpu_plugin.so) was not found: run scripts/setup.sh \
             (or set TPUSERVE_PJRT_CPU_PLUGIN)"
        )
    });
    Plugin::load(&path).unwrap_or_else(|e| {
        panic!(
            "cannot load the PJRT CPU plugin {}: {e}; run scripts/setup.sh",
            path.display()
        )
    })
}

fn client(devices: i64) -> Client {
    Client::new(&plugin(), &[("cpu_device_count", NamedValue::I64(devices))])
        .expect("create CPU client")
}

/// f32 -> bf16 bits, round to nearest even (inputs here are finite).
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounding = 0x7fff + ((bits >> 16) & 1);
    ((bits + rounding) >> 16) as u16
}

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter()
        .flat_map(|&x| bf16_bits(x).to_ne_bytes())
        .collect()
}

const ADD: &str = r#"
module @add attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%a: tensor<2x3xf32>, %b: tensor<2x3xf32>) -> tensor<2x3xf32> {
    %0 = stablehlo.add %a, %b : tensor<2x3xf32>
    return %0 : tensor<2x3xf32>
  }
}
"#;

/// (a) One device: platform and device queries, then compile and run an f32 add.
#[test]
fn add_two_f32_tensors_on_one_device() {
    let plugin = plugin();
    let (major, minor) = plugin.api_version();
    assert_eq!(major, 0);
    assert!(
        minor >= 81,
        "plugin API 0.{minor} is older than the 0.81 header"
    );
    let attrs = plugin.attributes().expect("plugin attributes");
    eprintln!("plugin {:?} attributes {attrs:?}", plugin);

    let client = client(1);
    assert_eq!(client.platform_name().unwrap(), "cpu");
    eprintln!("platform version {:?}", client.platform_version().unwrap());
    let devices = client.addressable_devices().unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(client.devices().unwrap().len(), 1);
    let device = &devices[0];
    assert_eq!(device.id().unwrap(), 0);
    assert_eq!(device.kind().unwrap(), "cpu");
    assert!(device.is_addressable().unwrap());
    eprintln!(
        "device {:?} {:?} attributes {:?} local_hardware_id {:?}",
        device.to_display_string(),
        device.debug_string(),
        device.attributes(),
        device.local_hardware_id()
    );
    assert_eq!(client.lookup_device(0).unwrap(), *device);

    let exe = client.compile(ADD, &CompileOptions::default()).unwrap();
    assert_eq!(exe.num_outputs(), 1);
    assert_eq!(exe.num_partitions().unwrap(), 1);
    assert_eq!(exe.num_replicas().unwrap(), 1);
    assert_eq!(exe.addressable_devices().unwrap(), devices);
    eprintln!(
        "executable {:?}, code size {:?}",
        exe.name(),
        exe.size_of_generated_code()
    );

    let a = Buffer::from_slice(&client, &[1f32, 2., 3., 4., 5., 6.], &[2, 3], device).unwrap();
    let b =
        Buffer::from_slice(&client, &[10f32, 20., 30., 40., 50., 60.], &[2, 3], device).unwrap();
    assert_eq!(a.dims().unwrap(), [2, 3]);
    assert_eq!(a.element_type().unwrap(), ElementType::F32);
    assert_eq!(a.on_device_size().unwrap(), 24);
    assert!(!a.is_deleted().unwrap());
    assert_eq!(a.device().unwrap(), *device);

    let out = exe.execute(&[vec![&a, &b]]).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].len(), 1);
    let c = &out[0][0];
    assert_eq!(c.dims().unwrap(), [2, 3]);
    assert_eq!(c.element_type().unwrap(), ElementType::F32);
    assert_eq!(c.to_vec::<f32>().unwrap(), [11., 22., 33., 44., 55., 66.]);
    // Inputs were not donated.
    assert!(!a.is_deleted().unwrap());
    assert_eq!(a.to_vec::<f32>().unwrap(), [1., 2., 3., 4., 5., 6.]);

    // The same program through compile_raw with explicitly serialized options.
    let exe2 = client
        .compile_raw(ADD.as_bytes(), "mlir", &CompileOptions::default().encode())
        .unwrap();
    let out2 = exe2.execute(&[[&a, &b]]).unwrap();
    assert_eq!(out2[0][0].to_host().unwrap(), c.to_host().unwrap());

    // num_replicas = 0 (what an empty CompileOptionsProto means) would make the CPU plugin abort
    // the process on a CHECK; compile() refuses it up front.
    let zero = CompileOptions {
        num_replicas: 0,
        ..CompileOptions::default()
    };
    let err = client.compile(ADD, &zero).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    // Caller-side validation: wrong byte count.
    let err = Buffer::from_host(&client, &[0u8; 7], ElementType::F32, &[2], device).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    // Wrong argument count is rejected by the plugin, with its message.
    let err = exe.execute(&[[&a]]).unwrap_err();
    eprintln!("execute with 1 of 2 arguments: {err}");
    assert!(matches!(err, Error::Pjrt { .. }), "{err}");
}

/// (b) bf16 x bf16 -> f32 dot_general.
#[test]
fn bf16_dot_general_accumulates_in_f32() {
    const DOT: &str = r#"
module @dot attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%x: tensor<4x8xbf16>, %w: tensor<8x4xbf16>) -> tensor<4x4xf32> {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0], precision = [DEFAULT, DEFAULT] : (tensor<4x8xbf16>, tensor<8x4xbf16>) -> tensor<4x4xf32>
    return %0 : tensor<4x4xf32>
  }
}
"#;
    let client = client(1);
    let device = &client.addressable_devices().unwrap()[0];
    // Values exactly representable in bf16 (multiples of 1/8 in [-2, 2]); products and sums
    // are exact in f32.
    let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 33) as f32 - 16.) / 8.).collect();
    let w: Vec<f32> = (0..32).map(|i| ((i * 5 % 29) as f32 - 14.) / 8.).collect();
    for v in x.iter().chain(&w) {
        assert_eq!(f32::from_bits(u32::from(bf16_bits(*v)) << 16), *v);
    }
    let xb =
        Buffer::from_host(&client, &bf16_bytes(&x), ElementType::BF16, &[4, 8], device).unwrap();
    let wb =
        Buffer::from_host(&client, &bf16_bytes(&w), ElementType::BF16, &[8, 4], device).unwrap();
    assert_eq!(xb.element_type().unwrap(), ElementType::BF16);
    assert_eq!(xb.on_device_size().unwrap(), 64);
    assert_eq!(xb.to_host().unwrap(), bf16_bytes(&x));

    let exe = client.compile(DOT, &CompileOptions::default()).unwrap();
    let out = exe.execute(&[[&xb, &wb]]).unwrap();
    let y = &out[0][0];
    assert_eq!(y.element_type().unwrap(), ElementType::F32);
    assert_eq!(y.dims().unwrap(), [4, 4]);
    let got = y.to_vec::<f32>().unwrap();
    for i in 0..4 {
        for j in 0..4 {
            let want: f32 = (0..8).map(|k| x[i * 8 + k] * w[k * 4 + j]).sum();
            assert_eq!(got[i * 4 + j], want, "y[{i}][{j}]");
        }
    }
}

const KV_UPDATE: &str = r#"
module @kv attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%cache: tensor<4x8xf32> {tf.aliasing_output = 0 : i32}, %row: tensor<1x8xf32>, %pos: tensor<i32>) -> tensor<4x8xf32> {
    %zero = stablehlo.constant dense<0> : tensor<i32>
    %0 = stablehlo.dynamic_update_slice %cache, %row, %pos, %zero : (tensor<4x8xf32>, tensor<1x8xf32>, tensor<i32>, tensor<i32>) -> tensor<4x8xf32>
    return %0 : tensor<4x8xf32>
  }
}
"#;

/// (c) Donation through `tf.aliasing_output`: the cache input is consumed and updated in place.
#[test]
fn donated_cache_is_updated_in_place() {
    let client = client(1);
    let device = &client.addressable_devices().unwrap()[0];
    let exe = client
        .compile(KV_UPDATE, &CompileOptions::default())
        .unwrap();

    let init: Vec<f32> = (0..32).map(|i| i as f32).collect();
    let cache = Buffer::from_slice(&client, &init, &[4, 8], device).unwrap();
    let cache_ptr = cache.unsafe_pointer().unwrap();
    let row = Buffer::from_slice(&client, &[-1f32; 8], &[1, 8], device).unwrap();
    let pos = Buffer::from_slice(&client, &[2i32], &[], device).unwrap();

    let out = exe.execute(&[[&cache, &row, &pos]]).unwrap();
    assert!(
        cache.is_deleted().unwrap(),
        "donated input must report deleted"
    );
    assert!(!row.is_deleted().unwrap());
    let updated = &out[0][0];
    assert_eq!(
        updated.unsafe_pointer().unwrap(),
        cache_ptr,
        "update ran in place"
    );
    let mut want = init.clone();
    want[16..24].fill(-1.);
    assert_eq!(updated.to_vec::<f32>().unwrap(), want);

    // Reading or re-running the donated buffer is an error from the plugin, not a crash.
    let err = cache.to_host().unwrap_err();
    eprintln!("reading a donated buffer: {err}");
    assert!(err.plugin_message().is_some_and(|m| !m.is_empty()), "{err}");
    let err = exe.execute(&[[&cache, &row, &pos]]).unwrap_err();
    eprintln!("executing with a donated buffer: {err}");
    assert!(matches!(err, Error::Pjrt { .. }), "{err}");

    // non_donatable_input_indices keeps the input alive; XLA copies instead.
    let opts = ExecuteOptions {
        non_donatable_input_indices: vec![0],
        ..Default::default()
    };
    let row2 = Buffer::from_slice(&client, &[7f32; 8], &[1, 8], device).unwrap();
    let pos0 = Buffer::from_slice(&client, &[0i32], &[], device).unwrap();
    let out2 = exe
        .execute_with_options(&[[updated, &row2, &pos0]], &opts)
        .unwrap();
    assert!(!updated.is_deleted().unwrap());
    assert_eq!(updated.to_vec::<f32>().unwrap(), want);
    let mut want2 = want.clone();
    want2[0..8].fill(7.);
    assert_eq!(out2[0][0].to_vec::<f32>().unwrap(), want2);
}

/// (d) serialize -> deserialize_and_load gives bitwise identical outputs.
#[test]
fn serialized_executable_round_trips_bitwise() {
    const MLP: &str = r#"
module @mlp attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%x: tensor<8x16xf32>, %w: tensor<16x16xf32>) -> (tensor<8x16xf32>, tensor<f32>) {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<8x16xf32>, tensor<16x16xf32>) -> tensor<8x16xf32>
    %1 = stablehlo.tanh %0 : tensor<8x16xf32>
    %2 = stablehlo.exponential %1 : tensor<8x16xf32>
    %init = stablehlo.constant dense<0.0> : tensor<f32>
    %3 = stablehlo.reduce(%2 init: %init) applies stablehlo.add across dimensions = [0, 1] : (tensor<8x16xf32>, tensor<f32>) -> tensor<f32>
    return %2, %3 : tensor<8x16xf32>, tensor<f32>
  }
}
"#;
    let client = client(1);
    let device = &client.addressable_devices().unwrap()[0];
    let exe = client.compile(MLP, &CompileOptions::default()).unwrap();
    assert_eq!(exe.num_outputs(), 2);
    let fingerprint = exe.fingerprint().unwrap();
    eprintln!("fingerprint {fingerprint:?}");
    let optimized = exe.optimized_program().unwrap();
    eprintln!(
        "optimized program: format {:?}, {} bytes",
        optimized.format,
        optimized.code.len()
    );
    assert!(!optimized.code.is_empty());

    let bytes = exe.serialize().unwrap();
    eprintln!("serialized executable: {} bytes", bytes.len());
    assert!(!bytes.is_empty());
    let loaded = client.deserialize_and_load(&bytes).unwrap();
    assert_eq!(loaded.num_outputs(), 2);
    if let (Some(a), Ok(Some(b))) = (&fingerprint, loaded.fingerprint()) {
        assert_eq!(*a, b);
    }

    let x: Vec<f32> = (0..128)
        .map(|i| ((i * 37 % 101) as f32 - 50.) / 61.)
        .collect();
    let w: Vec<f32> = (0..256)
        .map(|i| ((i * 53 % 97) as f32 - 48.) / 211.)
        .collect();
    let xb = Buffer::from_slice(&client, &x, &[8, 16], device).unwrap();
    let wb = Buffer::from_slice(&client, &w, &[16, 16], device).unwrap();
    let fresh = exe.execute(&[[&xb, &wb]]).unwrap();
    let again = loaded.execute(&[[&xb, &wb]]).unwrap();
    for k in 0..2 {
        assert_eq!(
            fresh[0][k].to_host().unwrap(),
            again[0][k].to_host().unwrap(),
            "output {k} differs"
        );
    }
    let sum = again[0][1].to_vec::<f32>().unwrap()[0];
    assert!(sum.is_finite() && sum > 0.);

    // Garbage is rejected with the plugin's error.
    let err = client
        .deserialize_and_load(b"not an executable")
        .unwrap_err();
    eprintln!("deserializing garbage: {err}");
    assert!(matches!(err, Error::Pjrt { .. }), "{err}");
}

/// (e) 8 CPU devices, GSPMD: column-parallel x row-parallel matmul, replicated result.
#[test]
fn spmd_matmul_over_eight_devices() {
    const TP: &str = r#"
module @tp attributes {mhlo.num_partitions = 8 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%x: tensor<16x64xf32> {mhlo.sharding = "{devices=[1,8]<=[8]}"}, %w: tensor<64x32xf32> {mhlo.sharding = "{devices=[8,1]<=[8]}"}) -> (tensor<16x32xf32> {mhlo.sharding = "{replicated}"}) {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<16x64xf32>, tensor<64x32xf32>) -> tensor<16x32xf32>
    return %0 : tensor<16x32xf32>
  }
}
"#;
    const N: usize = 8;
    let client = client(N as i64);
    let devices = client.addressable_devices().unwrap();
    assert_eq!(devices.len(), N);
    for (i, d) in devices.iter().enumerate() {
        assert_eq!(d.id().unwrap(), i as i32);
        assert_eq!(d.kind().unwrap(), "cpu");
    }

    let exe = client.compile(TP, &CompileOptions::spmd(N as i64)).unwrap();
    assert_eq!(exe.num_partitions().unwrap(), N);
    assert_eq!(exe.num_outputs(), 1);
    let exe_devices = exe.addressable_devices().unwrap();
    assert_eq!(exe_devices, devices);

    // Small integers: every product and sum is exact in f32.
    let x: Vec<f32> = (0..16 * 64).map(|i| (i % 7) as f32 - 3.).collect();
    let w: Vec<f32> = (0..64 * 32).map(|i| (i % 5) as f32 - 2.).collect();
    let mut args_owned = Vec::new();
    for (d, device) in exe_devices.iter().enumerate() {
        // x sharded on columns: device d gets x[:, 8d..8d+8] (16x8).
        let xs: Vec<f32> = (0..16)
            .flat_map(|r| x[r * 64 + 8 * d..r * 64 + 8 * d + 8].to_vec())
            .collect();
        // w sharded on rows: device d gets w[8d..8d+8, :] (8x32).
        let ws = w[8 * d * 32..(8 * d + 8) * 32].to_vec();
        args_owned.push((
            Buffer::from_slice(&client, &xs, &[16, 8], device).unwrap(),
            Buffer::from_slice(&client, &ws, &[8, 32], device).unwrap(),
        ));
    }
    let args: Vec<Vec<&Buffer>> = args_owned.iter().map(|(a, b)| vec![a, b]).collect();
    let out = exe.execute(&args).unwrap();
    assert_eq!(out.len(), N);

    let mut want = vec![0f32; 16 * 32];
    for i in 0..16 {
        for j in 0..32 {
            want[i * 32 + j] = (0..64).map(|k| x[i * 64 + k] * w[k * 32 + j]).sum();
        }
    }
    for (d, outputs) in out.iter().enumerate() {
        assert_eq!(outputs.len(), 1);
        let y = &outputs[0];
        assert_eq!(y.dims().unwrap(), [16, 32], "device {d}");
        assert_eq!(y.device().unwrap(), exe_devices[d]);
        assert_eq!(y.to_vec::<f32>().unwrap(), want, "device {d}");
    }

    // The SPMD executable round-trips through serialization too.
    let loaded = client
        .deserialize_and_load(&exe.serialize().unwrap())
        .unwrap();
    let again = loaded.execute(&args).unwrap();
    assert_eq!(again.len(), N);
    assert_eq!(again[N - 1][0].to_vec::<f32>().unwrap(), want);
}

/// (f) A malformed program is an error carrying the plugin's message, not a panic.
#[test]
fn malformed_mlir_is_a_plugin_error() {
    let client = client(1);
    let err = client
        .compile("this is not MLIR {", &CompileOptions::default())
        .unwrap_err();
    eprintln!("malformed MLIR: {err}");
    match &err {
        Error::Pjrt {
            function, message, ..
        } => {
            assert_eq!(*function, "PJRT_Client_Compile");
            assert!(!message.is_empty());
        }
        other => panic!("expected a plugin error, got {other:?}"),
    }

    // Well-formed MLIR that does not type-check is rejected as well.
    let bad_types = r#"
func.func public @main(%a: tensor<2xf32>, %b: tensor<3xf32>) -> tensor<2xf32> {
  %0 = stablehlo.add %a, %b : (tensor<2xf32>, tensor<3xf32>) -> tensor<2xf32>
  return %0 : tensor<2xf32>
}
"#;
    let err = client
        .compile(bad_types, &CompileOptions::default())
        .unwrap_err();
    eprintln!("ill-typed MLIR: {err}");
    assert!(err.plugin_message().is_some_and(|m| !m.is_empty()), "{err}");
}

/// Owned, aligned host bytes handed over with `kImmutableZeroCopy`: the CPU plugin adopts them
/// as the buffer (its address is the host bytes' address), they read back intact, a program
/// consumes them, and dropping the buffer frees them only after the plugin is done.
#[test]
fn owned_host_bytes_are_adopted_without_a_copy() {
    let c = client(1);
    let dev = &c.addressable_devices().unwrap()[0];
    let vals: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5).collect();
    let mut bytes = AlignedBytes::zeroed(vals.len() * 4);
    for (d, v) in bytes.as_mut_slice().chunks_mut(4).zip(&vals) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
    let host_addr = bytes.as_slice().as_ptr() as usize;
    let b = Buffer::from_host_owned(&c, bytes, ElementType::F32, &[1024], dev).unwrap();
    assert_eq!(
        b.unsafe_pointer().unwrap(),
        host_addr,
        "the CPU plugin copied instead of adopting"
    );
    assert_eq!(b.to_vec::<f32>().unwrap(), vals);
    let exe = c
        .compile(
            "module @m { func.func public @main(%a: tensor<1024xf32>) -> tensor<1024xf32> { \
             %0 = \"stablehlo.add\"(%a, %a) : (tensor<1024xf32>, tensor<1024xf32>) -> tensor<1024xf32> \
             return %0 : tensor<1024xf32> } }",
            &CompileOptions::default(),
        )
        .unwrap();
    let out = exe.execute(&[[&b]]).unwrap();
    drop(b);
    let doubled: Vec<f32> = vals.iter().map(|v| v * 2.0).collect();
    assert_eq!(out[0][0].to_vec::<f32>().unwrap(), doubled);
    assert!(
        Buffer::from_host_owned(&c, AlignedBytes::zeroed(12), ElementType::F32, &[4], dev).is_err()
    );
}
