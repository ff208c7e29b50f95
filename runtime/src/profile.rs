//! Opt-in profiling of named regions by device time (`qlora-rt bench --profile`). [`scope`] returns a guard that
//! marks where its region starts and, dropped, where it ends ([`Mark`]s: CUDA events on a GPU). While profiling is
//! off a scope costs one relaxed atomic load and marks nothing, so call sites stay in the training path.
//!
//! Regions nest: a checkpointed layer's backward holds its recomputed forward and the backward of every op inside.
//! [`stop`] reports each name's exclusive time, its regions' time less that of the regions directly inside them, so
//! the rows add up to the profiled time without counting any work twice.
//!
//! Owns the switch and the recorded marks; call sites choose the names (the tape's backward names each op, the
//! model names its forward pieces). One profile at a time per process.

use crate::timing::Mark;
use crate::{Device, Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Which pass a region belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pass {
    Forward,
    Backward,
}

/// How a name's regions ran, for the report: a forward inside a backward region is a checkpoint's recomputation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Forward,
    Backward,
    Recompute,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Forward => "forward",
            Role::Backward => "backward",
            Role::Recompute => "recompute",
        }
    }
}

/// One name's share of a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionTime {
    pub role: Role,
    pub name: &'static str,
    pub calls: usize,
    /// Exclusive device time over all its regions.
    pub ms: f64,
}

static ON: AtomicBool = AtomicBool::new(false);
static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

struct Region {
    pass: Pass,
    name: &'static str,
    start: Mark,
    end: Option<Mark>,
    parent: Option<usize>,
}

struct Recorder {
    device: Device,
    regions: Vec<Region>,
    /// Regions begun and not yet ended, innermost last.
    open: Vec<usize>,
    /// The first failure to mark (a guard's drop cannot return it); [`stop`] reports it.
    error: Option<Error>,
}

fn recorder() -> MutexGuard<'static, Option<Recorder>> {
    // A panic while marking leaves whole regions behind; the lists stay usable.
    RECORDER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts profiling the work queued on `device`, dropping any earlier unfinished profile.
pub fn start(device: Device) {
    *recorder() = Some(Recorder { device, regions: Vec::new(), open: Vec::new(), error: None });
    ON.store(true, Ordering::Relaxed);
}

/// Whether regions are being recorded.
pub fn is_on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Stops profiling and returns each (role, name)'s exclusive time, longest first; waits for the profiled work.
pub fn stop() -> Result<Vec<RegionTime>> {
    ON.store(false, Ordering::Relaxed);
    let Some(rec) = recorder().take() else {
        return Err(Error::invalid("profile", "stop without start"));
    };
    if let Some(e) = rec.error {
        return Err(e);
    }
    let mut total = vec![0.0; rec.regions.len()];
    let mut inner = vec![0.0; rec.regions.len()];
    for (i, r) in rec.regions.iter().enumerate() {
        // A region still open when profiling stopped has no end to measure to.
        let Some(end) = &r.end else { continue };
        total[i] = r.start.elapsed_ms(end)?;
        if let Some(p) = r.parent {
            inner[p] += total[i];
        }
    }
    let mut by_name: HashMap<(Role, &'static str), (usize, f64)> = HashMap::new();
    for (i, r) in rec.regions.iter().enumerate().filter(|(_, r)| r.end.is_some()) {
        let entry = by_name.entry((role(&rec.regions, i), r.name)).or_default();
        entry.0 += 1;
        entry.1 += (total[i] - inner[i]).max(0.0);
    }
    let mut rows: Vec<RegionTime> =
        by_name.into_iter().map(|((role, name), (calls, ms))| RegionTime { role, name, calls, ms }).collect();
    rows.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(b.name)));
    Ok(rows)
}

/// Forward regions with a backward region around them are recomputations.
fn role(regions: &[Region], i: usize) -> Role {
    match regions[i].pass {
        Pass::Backward => Role::Backward,
        Pass::Forward => {
            let mut up = regions[i].parent;
            while let Some(p) = up {
                if regions[p].pass == Pass::Backward {
                    return Role::Recompute;
                }
                up = regions[p].parent;
            }
            Role::Forward
        }
    }
}

/// Times the guard's lifetime as a region named `name` of `pass` while profiling is on.
#[must_use = "the region ends when the guard is dropped"]
pub fn scope(pass: Pass, name: &'static str) -> Scope {
    if !ON.load(Ordering::Relaxed) {
        return Scope { index: None };
    }
    let mut guard = recorder();
    let Some(rec) = guard.as_mut() else { return Scope { index: None } };
    match Mark::now(rec.device) {
        Ok(start) => {
            let index = rec.regions.len();
            rec.regions.push(Region { pass, name, start, end: None, parent: rec.open.last().copied() });
            rec.open.push(index);
            Scope { index: Some(index) }
        }
        Err(e) => {
            rec.error.get_or_insert(e);
            Scope { index: None }
        }
    }
}

/// Ends its region when dropped.
pub struct Scope {
    index: Option<usize>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some(index) = self.index else { return };
        let mut guard = recorder();
        // Profiling stopped (or restarted) inside the region: it belongs to no profile now.
        let Some(rec) = guard.as_mut() else { return };
        if rec.regions.get(index).is_none_or(|r| r.end.is_some()) {
            return;
        }
        match Mark::now(rec.device) {
            Ok(end) => rec.regions[index].end = Some(end),
            Err(e) => {
                rec.error.get_or_insert(e);
            }
        }
        if let Some(at) = rec.open.iter().rposition(|&i| i == index) {
            rec.open.truncate(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names, roles and call counts (times are the host clock's here, so only their bookkeeping is checked).
    #[test]
    fn nested_regions_are_counted_once_by_role() {
        start(Device::Cpu);
        {
            let _fwd = scope(Pass::Forward, "layer");
        }
        {
            let _bwd = scope(Pass::Backward, "checkpoint");
            let _re = scope(Pass::Forward, "layer");
            let _op = scope(Pass::Backward, "matmul");
        }
        let rows = stop().unwrap();
        let mut got: Vec<(&str, &str, usize)> = rows.iter().map(|r| (r.role.as_str(), r.name, r.calls)).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("backward", "checkpoint", 1),
                ("backward", "matmul", 1),
                ("forward", "layer", 1),
                ("recompute", "layer", 1)
            ]
        );
        assert!(rows.iter().all(|r| r.ms >= 0.0));
        assert!(!is_on());
        let _ignored = scope(Pass::Forward, "off");
        assert!(stop().is_err(), "nothing was started");
    }
}
