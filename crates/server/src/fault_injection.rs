//! Step-failure injection for fault tests of the real binary: with
//! `TPUSERVE_INJECT_STEP_FAILURES=20,21:panic` the 21st executed step returns a device error
//! and the 22nd panics inside the runner. Off unless the variable is set, and loudly logged
//! when it is.
//!
//! The policy it exercises: a failed step ends the requests it carried with an error (500, or
//! an error event on a stream), frees their KV blocks, and the server keeps serving. Exiting
//! instead would turn one bad batch into a pod restart that drops every other request and
//! pays the whole start-up again.

use std::sync::Arc;

use tpuserve_runner_api::{
    CompileCounters, KvCacheShape, ModelRunner, RunnerError, SamplingSupport, StepOutput, StepPlan,
};

pub const ENV: &str = "TPUSERVE_INJECT_STEP_FAILURES";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Error,
    Panic,
}

/// Parses `N[:panic|:error],...` (0-based indices of executed steps).
pub fn parse(spec: &str) -> Result<Vec<(usize, Fault)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            let (n, kind) = item.split_once(':').unwrap_or((item, "error"));
            let n = n
                .parse::<usize>()
                .map_err(|_| format!("{ENV}: `{item}` is not STEP[:error|:panic]"))?;
            let kind = match kind {
                "error" => Fault::Error,
                "panic" => Fault::Panic,
                other => return Err(format!("{ENV}: unknown fault `{other}`")),
            };
            Ok((n, kind))
        })
        .collect()
}

/// Wraps a runner and fails the listed steps.
pub struct FaultyRunner {
    inner: Box<dyn ModelRunner>,
    faults: Vec<(usize, Fault)>,
    step: usize,
}

impl FaultyRunner {
    pub fn new(inner: Box<dyn ModelRunner>, faults: Vec<(usize, Fault)>) -> Self {
        FaultyRunner {
            inner,
            faults,
            step: 0,
        }
    }
}

impl ModelRunner for FaultyRunner {
    fn execute(&mut self, plan: &StepPlan) -> Result<StepOutput, RunnerError> {
        let step = self.step;
        self.step += 1;
        match self.faults.iter().find(|(n, _)| *n == step).map(|f| f.1) {
            Some(Fault::Error) => Err(RunnerError::Device(format!(
                "injected failure at step {step}"
            ))),
            Some(Fault::Panic) => panic!("injected panic at step {step}"),
            None => self.inner.execute(plan),
        }
    }
    fn compile_counters(&self) -> Option<Arc<CompileCounters>> {
        self.inner.compile_counters()
    }
    fn sampling_support(&self) -> SamplingSupport {
        self.inner.sampling_support()
    }
    fn kv_cache_shape(&self) -> KvCacheShape {
        self.inner.kv_cache_shape()
    }
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn describe(&self) -> String {
        format!("{} with injected step failures", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps_and_kinds_and_rejects_garbage() {
        assert_eq!(
            parse("3, 5:panic,7:error").unwrap(),
            vec![(3, Fault::Error), (5, Fault::Panic), (7, Fault::Error)]
        );
        assert!(parse("x").is_err());
        assert!(parse("4:explode").unwrap_err().contains("explode"));
        assert!(parse("").unwrap().is_empty());
    }
}
