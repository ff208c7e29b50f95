//! The tape: records coarse ops in execution order and replays their hand-written backward in reverse.
//!
//! Values never live on the tape, only what each op chose to save for its backward, so the saved-bytes
//! counter is the true activation memory of a step, and a checkpoint scope that saves only its inputs
//! measurably lowers it.

use crate::Param;
pub use qlora_runtime::op::Backward;
use qlora_runtime::op::Recorded;
use qlora_runtime::ops::elementwise::add;
use qlora_runtime::profile::{self, Pass};
use qlora_runtime::{Error, Result, Tensor};
use smallvec::SmallVec;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub(crate) type VarId = usize;

/// A value flowing through a recorded computation: a tensor plus, when a gradient can reach it, its tape id.
/// Inputs enter as [`Var::constant`] (no gradient) or through [`Tape::param`]; every tape op returns a new one.
///
/// ```
/// use qlora_autograd::{Tape, Var};
/// use qlora_runtime::{DType, Tensor};
///
/// let tape = Tape::new();
/// let x = Var::constant(Tensor::ones(&[2, 2], DType::F32));
/// let y = tape.scale(&x, 3.0)?;
/// assert!(!y.requires_grad(), "nothing trainable reaches it");
/// assert_eq!(y.value().to_vec::<f32>(), vec![3.0; 4]);
/// # Ok::<(), qlora_runtime::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Var {
    value: Tensor,
    id: Option<VarId>,
}

impl Var {
    /// A value no gradient flows to (inputs, masks, frozen weights).
    pub fn constant(value: Tensor) -> Self {
        Var { value, id: None }
    }

    pub fn value(&self) -> &Tensor {
        &self.value
    }

    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    /// Whether backward can produce a gradient for this value.
    pub fn requires_grad(&self) -> bool {
        self.id.is_some()
    }

    pub(crate) fn id(&self) -> Option<VarId> {
        self.id
    }
}

/// Bytes saved for backward right now and at most, shared by a tape and the tapes its checkpoints create.
#[derive(Debug, Default)]
pub struct SavedBytes {
    current: AtomicUsize,
    peak: AtomicUsize,
}

impl SavedBytes {
    pub fn current(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        let now = self.current.fetch_add(n, Ordering::Relaxed) + n;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.current.fetch_sub(n, Ordering::Relaxed);
    }
}

enum Node {
    Op {
        op: Box<dyn Backward>,
        bytes: usize,
        inputs: SmallVec<[Option<VarId>; 4]>,
        outputs: SmallVec<[VarId; 2]>,
    },
    /// A trainable parameter entered the graph here; its gradient goes to the parameter's buffer.
    Param {
        id: VarId,
        param: Param,
    },
}

/// Records ops. Single-threaded by design (ops themselves are parallel inside).
///
/// A forward pass records each op with what its backward needs; [`Tape::backward`] runs them in reverse and adds
/// the gradients into the trainable [`Param`]s; [`Tape::no_grad`] runs ops without recording (inference).
///
/// ```
/// use qlora_autograd::{Param, Tape, Var};
/// use qlora_runtime::{DType, Tensor};
///
/// let w = Param::trainable("w", Tensor::from_vec(vec![1.0f32, -2.0], &[1, 2])?);
/// let tape = Tape::new();
/// let x = Var::constant(Tensor::from_vec(vec![3.0f32, 4.0], &[1, 2])?);
/// let y = tape.linear(&x, &tape.param(&w), None)?; // x·wᵀ = 3 − 8
/// let loss = tape.sum(&tape.mul(&y, &y)?)?; // y²
/// tape.backward(&loss)?;
/// // ∂(x·wᵀ)²/∂w = 2·y·x = 2·(−5)·[3, 4]
/// assert_eq!(w.grad().unwrap().to_vec::<f32>(), vec![-30.0, -40.0]);
/// # Ok::<(), qlora_runtime::Error>(())
/// ```
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    next_id: Cell<VarId>,
    recording: Cell<bool>,
    /// Set whenever a trainable parameter enters, recorded or not: tells a checkpoint scope whether it can
    /// produce any gradient.
    trainable_seen: Cell<bool>,
    saved: Arc<SavedBytes>,
    /// A checkpoint's recompute tape: [`Tape::recomputing`].
    recomputing: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Self::new()
    }
}

impl Tape {
    pub fn new() -> Self {
        Self::with_saved_bytes(Arc::new(SavedBytes::default()), false)
    }

    fn with_saved_bytes(saved: Arc<SavedBytes>, recomputing: bool) -> Self {
        Tape {
            nodes: RefCell::new(Vec::new()),
            next_id: Cell::new(0),
            recording: Cell::new(true),
            trainable_seen: Cell::new(false),
            saved,
            recomputing,
        }
    }

    /// The tape a checkpoint scope's backward recomputes its closure on, sharing the outer tape's saved bytes.
    pub(crate) fn for_recompute(saved: Arc<SavedBytes>) -> Self {
        Self::with_saved_bytes(saved, true)
    }

    /// Whether this tape is a checkpoint scope's recompute (`Tape::checkpoint`), run inside backward: the scope's
    /// outputs are then read only as the places its output gradients enter, never for their values. A closure may
    /// skip computing a value that reaches its outputs only through ops whose backward reads no values (add,
    /// concatenation), recording it with [`Tape::lora_linear_unread`].
    pub fn recomputing(&self) -> bool {
        self.recomputing
    }

    /// Activation memory held for backward.
    pub fn saved_bytes(&self) -> &Arc<SavedBytes> {
        &self.saved
    }

    pub fn is_recording(&self) -> bool {
        self.recording.get()
    }

    /// Runs `f` without recording: every result is a constant and nothing is saved (evaluation, generation,
    /// the forward pass of a checkpoint scope).
    pub fn no_grad<R>(&self, f: impl FnOnce() -> R) -> R {
        let before = self.recording.replace(false);
        let restore = RestoreOnDrop { cell: &self.recording, value: before };
        let r = f();
        drop(restore);
        r
    }

    /// Runs `f` and reports whether it reached a trainable parameter.
    pub(crate) fn watch_trainable<R>(&self, f: impl FnOnce() -> R) -> (R, bool) {
        let outer = self.trainable_seen.replace(false);
        let r = f();
        let seen = self.trainable_seen.get();
        self.trainable_seen.set(outer || seen);
        (r, seen)
    }

    fn fresh_id(&self) -> VarId {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    /// A parameter as a graph value: trainable ones get a gradient path while recording; frozen ones are constants.
    pub fn param(&self, p: &Param) -> Var {
        let value = p.value();
        if p.is_trainable() {
            self.trainable_seen.set(true);
        }
        if !(p.is_trainable() && self.is_recording()) {
            return Var::constant(value);
        }
        let id = self.fresh_id();
        self.nodes.borrow_mut().push(Node::Param { id, param: p.clone() });
        Var { value, id: Some(id) }
    }

    /// A differentiable input whose gradient `backward_with` returns (checkpoint scopes use this).
    pub(crate) fn input(&self, value: Tensor) -> Var {
        Var { value, id: Some(self.fresh_id()) }
    }

    /// Records `op` producing `outputs` from `inputs`. When no input needs a gradient, or the tape is not
    /// recording, the op (and what it saved) is dropped at once and the outputs are constants.
    pub fn record(&self, op: Box<dyn Backward>, inputs: &[&Var], outputs: Vec<Tensor>) -> Vec<Var> {
        let needed = inputs.iter().any(|v| v.id.is_some());
        self.record_if(needed, op, inputs, outputs)
    }

    /// [`Tape::record`] with the caller deciding whether a gradient can flow (a checkpoint scope can reach
    /// trainable parameters even when none of its inputs needs a gradient).
    pub(crate) fn record_if(
        &self,
        needed: bool,
        op: Box<dyn Backward>,
        inputs: &[&Var],
        outputs: Vec<Tensor>,
    ) -> Vec<Var> {
        if !self.is_recording() || !needed {
            return outputs.into_iter().map(Var::constant).collect();
        }
        let outs: Vec<Var> = outputs.into_iter().map(|value| Var { value, id: Some(self.fresh_id()) }).collect();
        let bytes = op.saved_bytes();
        self.saved.add(bytes);
        self.nodes.borrow_mut().push(Node::Op {
            op,
            bytes,
            inputs: inputs.iter().map(|v| v.id).collect(),
            outputs: outs.iter().map(|v| v.id.expect("assigned above")).collect(),
        });
        outs
    }

    /// Single-output [`Tape::record`].
    pub fn record1(&self, op: Box<dyn Backward>, inputs: &[&Var], output: Tensor) -> Var {
        self.record(op, inputs, vec![output]).pop().expect("one output recorded")
    }

    /// Runs one runtime op (`qlora_runtime::ops::*::*_op`) on the inputs' values, telling it which inputs want a
    /// gradient so it saves only what those need, and records it.
    pub fn apply<const N: usize>(
        &self,
        inputs: [&Var; N],
        op: impl FnOnce([&Tensor; N], [bool; N]) -> qlora_runtime::Result<Recorded>,
    ) -> Result<Var> {
        let (y, grad) = op(inputs.map(Var::value), inputs.map(Var::requires_grad))?;
        Ok(self.record1(grad, &inputs, y))
    }

    /// Backpropagates from a scalar `loss` (seed 1), accumulating into trainable parameters' gradients.
    pub fn backward(&self, loss: &Var) -> Result<()> {
        if loss.value.elem_count() != 1 {
            return Err(Error::shape("backward", format!("loss must be a scalar, got shape {:?}", loss.shape())));
        }
        // Made on the loss's device: a memset, nothing crosses from the host.
        let seed = Tensor::full_on(loss.shape(), 1.0, loss.value.dtype(), loss.value.device())?;
        self.backward_with(&[(loss, seed)]).map(|_| ())
    }

    /// Backpropagates the given output gradients. Consumes the tape's records (each op's saved tensors are freed
    /// as soon as its backward has run) and returns the gradients that reached vars made by `input`.
    pub fn backward_with(&self, seeds: &[(&Var, Tensor)]) -> Result<HashMap<VarId, Tensor>> {
        let mut grads: HashMap<VarId, Tensor> = HashMap::new();
        for (var, g) in seeds {
            if g.shape() != var.shape() {
                return Err(Error::shape("backward", format!("gradient {:?} for value {:?}", g.shape(), var.shape())));
            }
            if let Some(id) = var.id {
                accumulate_into(&mut grads, id, g.clone())?;
            }
        }
        let nodes = std::mem::take(&mut *self.nodes.borrow_mut());
        let mut remaining = nodes;
        while let Some(node) = remaining.pop() {
            match node {
                Node::Param { id, param } => {
                    if let Some(g) = grads.remove(&id) {
                        param.accumulate_grad(&g)?;
                    }
                }
                Node::Op { op, bytes, inputs, outputs } => {
                    let out_grads: Vec<Option<Tensor>> = outputs.iter().map(|id| grads.remove(id)).collect();
                    if out_grads.iter().all(Option::is_none) {
                        self.saved.sub(bytes);
                        continue;
                    }
                    let name = op.name();
                    let region = profile::scope(Pass::Backward, name);
                    let in_grads = op.backward(&out_grads);
                    drop(region);
                    self.saved.sub(bytes);
                    let in_grads = in_grads?;
                    if in_grads.len() != inputs.len() {
                        return Err(Error::invalid(name, "backward returned a wrong number of gradients"));
                    }
                    for (id, g) in inputs.iter().zip(in_grads) {
                        if let (Some(id), Some(g)) = (id, g) {
                            accumulate_into(&mut grads, *id, g)?;
                        }
                    }
                }
            }
        }
        Ok(grads)
    }
}

impl Drop for Tape {
    fn drop(&mut self) {
        // A tape dropped without backward (an evaluation step, an error) releases what its ops saved.
        for node in self.nodes.get_mut().drain(..) {
            if let Node::Op { bytes, .. } = node {
                self.saved.sub(bytes);
            }
        }
    }
}

fn accumulate_into(grads: &mut HashMap<VarId, Tensor>, id: VarId, g: Tensor) -> Result<()> {
    match grads.remove(&id) {
        Some(prev) => {
            grads.insert(id, add(&prev, &g)?);
        }
        None => {
            grads.insert(id, g);
        }
    }
    Ok(())
}

struct RestoreOnDrop<'a> {
    cell: &'a Cell<bool>,
    value: bool,
}

impl Drop for RestoreOnDrop<'_> {
    fn drop(&mut self) {
        self.cell.set(self.value);
    }
}
