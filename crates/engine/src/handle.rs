//! Runs an [`EngineCore`] on its own OS thread. The outside talks to it only through a
//! command channel (add / abort) and the per-request output streams; the thread blocks on
//! the command channel whenever it has no work, so an idle engine costs nothing.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use crate::engine::EngineCore;
use crate::error::EngineError;
use crate::error::RequestError;
use crate::output::{RequestOutput, RequestStream};
use crate::request::{EngineRequest, RequestId};
use crate::validation::{RequestLimits, ValidatedRequest};

enum Command {
    Add(Box<ValidatedRequest>, UnboundedSender<RequestOutput>),
    Abort(RequestId),
    Shutdown,
}

/// The server's handle on the engine. `add` and `abort` never block on the engine.
pub struct EngineHandle {
    tx: Sender<Command>,
    limits: RequestLimits,
    thread: Option<JoinHandle<EngineCore>>,
}

impl EngineHandle {
    /// Moves `core` onto a new thread named `tpuserve-engine` and starts its loop.
    pub fn spawn(core: EngineCore) -> Result<Self, EngineError> {
        let limits = core.limits();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tpuserve-engine".into())
            .spawn(move || run(core, rx))
            .map_err(|e| EngineError::Spawn(e.to_string()))?;
        Ok(EngineHandle {
            tx,
            limits,
            thread: Some(thread),
        })
    }

    /// What requests are validated against (max_model_len, vocabulary, max_logprobs, the
    /// sampler's support).
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// The engine's gate, run on the caller's thread (see [`RequestLimits::validate`]).
    pub fn validate(&self, req: EngineRequest) -> Result<ValidatedRequest, RequestError> {
        self.limits.validate(req)
    }

    /// Queues a request that passed the gate. Events arrive on the returned stream;
    /// dropping the stream aborts the request.
    pub fn add(&self, req: ValidatedRequest) -> Result<RequestStream, EngineError> {
        let (out_tx, out_rx) = unbounded_channel();
        let id = req.id();
        self.tx
            .send(Command::Add(Box::new(req), out_tx))
            .map_err(|_| EngineError::Stopped)?;
        Ok(RequestStream {
            id,
            receiver: out_rx,
        })
    }

    /// Ends a request; its blocks are freed before the next step. Unknown ids are ignored.
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// Whether the engine thread is still alive (for health checks).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Aborts whatever is unfinished, stops the thread and gives the core back.
    pub fn shutdown(mut self) -> Result<EngineCore, EngineError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<EngineCore, EngineError> {
        let _ = self.tx.send(Command::Shutdown);
        let thread = self.thread.take().ok_or(EngineError::Stopped)?;
        thread.join().map_err(|_| EngineError::Stopped)
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop();
        }
    }
}

/// Applies one command; false on shutdown.
fn handle(core: &mut EngineCore, cmd: Command) -> bool {
    match cmd {
        Command::Add(req, tx) => core.insert(*req, tx),
        Command::Abort(id) => core.abort_request(id),
        Command::Shutdown => return false,
    }
    true
}

fn run(mut core: EngineCore, rx: Receiver<Command>) -> EngineCore {
    loop {
        if !core.has_unfinished() {
            let Ok(cmd) = rx.recv() else { break };
            if !handle(&mut core, cmd) {
                break;
            }
        }
        let (mut stop, mut disconnected) = (false, false);
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !handle(&mut core, cmd) {
                        stop = true;
                        break;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        // A handle gone without a shutdown: finish what is queued, then stop.
        if stop || (disconnected && !core.has_unfinished()) {
            break;
        }
        if !core.step() && core.has_unfinished() {
            // Nothing could be scheduled (should not happen): wait instead of spinning.
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(cmd) => {
                    if !handle(&mut core, cmd) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    core.abort_all();
    core
}
