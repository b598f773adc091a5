//! `xla.CompileOptionsProto`, serialized by a tiny hand-written protobuf encoder.
//!
//! Field numbers (from XLA's `xla/pjrt/proto/compile_options.proto` and `xla/xla_data.proto`):
//!
//! ```text
//! CompileOptionsProto        3: executable_build_options, 7: env_option_overrides (map)
//! ExecutableBuildOptionsProto 4: num_replicas, 5: num_partitions, 6: use_spmd_partitioning,
//!                            9: device_assignment, 19: use_shardy_partitioner
//! DeviceAssignmentProto      1: replica_count, 2: computation_count,
//!                            3: computation_devices { 1: repeated int64 replica_device_ids }
//! OptionOverrideProto        1: string, 2: bool, 3: int64, 4: double
//! ```

/// Value of an XLA option override (`OptionOverrideProto`), e.g. a debug option by name.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionOverride {
    Str(String),
    Bool(bool),
    Int(i64),
    Double(f64),
}

/// The compile options this crate can express.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileOptions {
    pub num_replicas: i64,
    pub num_partitions: i64,
    /// GSPMD partitioning of a module with `mhlo.sharding` annotations over `num_partitions`
    /// devices.
    pub use_spmd_partitioning: bool,
    /// Use Shardy (`sdy.*` annotations) instead of GSPMD.
    pub use_shardy_partitioner: bool,
    /// Static device assignment, indexed `[partition][replica]` → device id
    /// (`DeviceAssignmentProto.computation_devices`). `None` lets the client choose.
    pub device_assignment: Option<Vec<Vec<i64>>>,
    /// `env_option_overrides`: XLA options by name (e.g. debug options).
    pub env_option_overrides: Vec<(String, OptionOverride)>,
}

impl Default for CompileOptions {
    /// One replica, one partition, nothing else set: what a single-device program needs.
    fn default() -> Self {
        Self {
            num_replicas: 1,
            num_partitions: 1,
            use_spmd_partitioning: false,
            use_shardy_partitioner: false,
            device_assignment: None,
            env_option_overrides: Vec::new(),
        }
    }
}

impl CompileOptions {
    /// One replica, `num_partitions` partitions, GSPMD partitioning on.
    pub fn spmd(num_partitions: i64) -> Self {
        Self {
            num_partitions,
            use_spmd_partitioning: true,
            ..Self::default()
        }
    }

    /// Serializes to `xla.CompileOptionsProto` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut build = Vec::new();
        put_int64(&mut build, 4, self.num_replicas);
        put_int64(&mut build, 5, self.num_partitions);
        put_bool(&mut build, 6, self.use_spmd_partitioning);
        if let Some(assignment) = &self.device_assignment {
            let mut da = Vec::new();
            let replicas = assignment.first().map_or(0, Vec::len);
            put_int64(&mut da, 1, replicas as i64);
            put_int64(&mut da, 2, assignment.len() as i64);
            for computation in assignment {
                let mut ids = Vec::new();
                for &id in computation {
                    put_varint(&mut ids, id as u64);
                }
                let mut cd = Vec::new();
                put_bytes(&mut cd, 1, &ids);
                put_bytes(&mut da, 3, &cd);
            }
            put_bytes(&mut build, 9, &da);
        }
        put_bool(&mut build, 19, self.use_shardy_partitioner);

        let mut out = Vec::new();
        put_bytes(&mut out, 3, &build);
        for (name, value) in &self.env_option_overrides {
            let mut v = Vec::new();
            match value {
                OptionOverride::Str(s) => put_bytes(&mut v, 1, s.as_bytes()),
                OptionOverride::Bool(b) => {
                    put_key(&mut v, 2, WIRE_VARINT);
                    put_varint(&mut v, u64::from(*b));
                }
                OptionOverride::Int(i) => {
                    put_key(&mut v, 3, WIRE_VARINT);
                    put_varint(&mut v, *i as u64);
                }
                OptionOverride::Double(d) => {
                    put_key(&mut v, 4, WIRE_FIXED64);
                    v.extend_from_slice(&d.to_le_bytes());
                }
            }
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, name.as_bytes());
            put_bytes(&mut entry, 2, &v);
            put_bytes(&mut out, 7, &entry);
        }
        out
    }
}

const WIRE_VARINT: u32 = 0;
const WIRE_FIXED64: u32 = 1;
const WIRE_LEN: u32 = 2;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

/// proto3 scalar: omitted when zero (the default).
fn put_int64(out: &mut Vec<u8>, field: u32, v: i64) {
    if v != 0 {
        put_key(out, field, WIRE_VARINT);
        // Negative int64 values are encoded as their 64-bit two's complement.
        put_varint(out, v as u64);
    }
}

/// proto3 bool: omitted when false.
fn put_bool(out: &mut Vec<u8>, field: u32, v: bool) {
    if v {
        put_key(out, field, WIRE_VARINT);
        put_varint(out, 1);
    }
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, WIRE_LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_partitions_spmd_matches_known_bytes() {
        assert_eq!(
            CompileOptions::spmd(8).encode(),
            [0x1a, 0x06, 0x20, 0x01, 0x28, 0x08, 0x30, 0x01]
        );
    }

    #[test]
    fn shardy_matches_known_bytes() {
        let opts = CompileOptions {
            use_shardy_partitioner: true,
            ..CompileOptions::spmd(8)
        };
        assert_eq!(
            opts.encode(),
            [0x1a, 0x09, 0x20, 0x01, 0x28, 0x08, 0x30, 0x01, 0x98, 0x01, 0x01]
        );
    }

    #[test]
    fn default_is_one_replica_one_partition() {
        assert_eq!(
            CompileOptions::default().encode(),
            [0x1a, 0x04, 0x20, 0x01, 0x28, 0x01]
        );
    }

    #[test]
    fn device_assignment_and_overrides() {
        let opts = CompileOptions {
            device_assignment: Some(vec![vec![3]]),
            env_option_overrides: vec![("k".into(), OptionOverride::Bool(true))],
            ..CompileOptions::default()
        };
        assert_eq!(opts.encode(), expected_da_bytes());
    }

    fn expected_da_bytes() -> Vec<u8> {
        // computation_devices { replica_device_ids: packed [3] } = 0a 01 03
        let cd = [0x0a, 0x01, 0x03];
        let mut da = vec![0x08, 0x01, 0x10, 0x01, 0x1a, cd.len() as u8];
        da.extend_from_slice(&cd);
        let mut build = vec![0x20, 0x01, 0x28, 0x01, 0x4a, da.len() as u8];
        build.extend_from_slice(&da);
        let mut out = vec![0x1a, build.len() as u8];
        out.extend_from_slice(&build);
        // env_option_overrides entry { key "k", value { bool_field: true } }
        let entry = [0x0a, 0x01, b'k', 0x12, 0x02, 0x10, 0x01];
        out.extend_from_slice(&[0x3a, entry.len() as u8]);
        out.extend_from_slice(&entry);
        out
    }

    #[test]
    fn varints() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut v = Vec::new();
        put_int64(&mut v, 1, -1);
        assert_eq!(v.len(), 11);
    }
}
