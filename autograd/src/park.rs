//! Parked scopes: a run of ops that keeps its activations (nothing is recomputed) but holds them in pinned host
//! memory between its forward and its backward (`qlora_runtime::park`). Where a checkpoint trades compute for device
//! memory, this trades the host link's bandwidth for it: a decoder layer's saved activations leave under the next
//! layers' forward and come back under the later layers' backward.

use crate::tape::{Tape, Var};
use qlora_runtime::op::backward_fn;
use qlora_runtime::park::{recording, Parked};
use qlora_runtime::Result;
use std::rc::Rc;

impl Tape {
    /// Runs `f` on `x`, recorded on this tape as usual, then parks the activation buffers it leaves alive (what its
    /// ops keep for backward; not its output) in host memory: their copy out starts now and runs under what comes
    /// next. `previous` is the set the chain's previous scope returned: its device memory goes now, a scope after its
    /// copy started, so the wait for that copy costs nothing when it took less than this scope's compute. In backward
    /// the scope brings its buffers back before its ops' backward reads them, then starts bringing `previous`'s back
    /// under the backward in between. Returns the output and this scope's set, for the next scope of the chain (the
    /// chain's last set stays on the device: its backward comes first). Without recording it is `f`'s plain call.
    pub fn parked<F>(&self, x: &Var, previous: Option<Rc<Parked>>, f: F) -> Result<(Var, Option<Rc<Parked>>)>
    where
        F: FnOnce(&Tape, &Var) -> Result<Var>,
    {
        if !self.is_recording() {
            return Ok((f(self, x)?, None));
        }
        let (out, recorded) = recording(|| f(self, x));
        let out = out?;
        let set = Rc::new(Parked::park(recorded, &[out.value()])?);
        if let Some(previous) = &previous {
            previous.release()?;
        }
        let mine = set.clone();
        let op = backward_fn("parked", 0, move |grads| {
            mine.restore()?;
            if let Some(previous) = &previous {
                previous.prefetch()?;
            }
            Ok(grads.to_vec())
        });
        let y = self.record1(op, &[&out], out.value().clone());
        Ok((y, Some(set)))
    }
}
