//! AdamW over a set of trainable parameters: f64 moments on the host for CPU parameters, f32 moments beside the
//! parameter for GPU ones (the fused CUDA kernel). Paged ([`AdamW::set_paged`]), GPU moments wait in pinned host
//! memory between updates, so that forward and backward have their room: every update brings them all back (the
//! copies queued at once on the copy stream, each parameter's update waiting only for its own) and parks them again
//! after. Explicit pinned copies rather than CUDA managed memory: the driver never decides when to move them, and
//! nothing asks it for more managed memory than the card has (which can hang a shared GPU).

use qlora_autograd::Param;
use qlora_runtime::adamw::{adamw_step, AdamWStep};
use qlora_runtime::memory::{tagged, Category};
use qlora_runtime::offload::Offloaded;
use qlora_runtime::ops::reduce::{sum_squares, sum_squares_multi_into};
use qlora_runtime::{DType, Device, Error, Result, Tensor};

/// Defaults are the QLoRA paper's and Hugging Face Trainer's: β = (0.9, 0.999), ε = 1e-8, no weight decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct Slot {
    param: Param,
    moments: Moments,
}

/// Where a parameter's moments live: in f64 on the host for a CPU parameter, so the CPU path is exact and
/// bit-reproducible; in f32 on the parameter's GPU otherwise, so a step never leaves the device.
enum Moments {
    Host {
        m: Vec<f64>,
        v: Vec<f64>,
    },
    // Boxed: a tensor handle carries its layout inline, several times a Vec's size.
    Device(Box<DeviceMoments>),
    /// GPU moments (m, v) parked in pinned host memory between updates.
    Paged(Box<[Offloaded; 2]>),
}

struct DeviceMoments {
    m: Tensor,
    v: Tensor,
}

impl Moments {
    fn zeros(n: usize, device: Device) -> Result<Moments> {
        Ok(match device {
            Device::Cpu => Moments::Host { m: vec![0.0; n], v: vec![0.0; n] },
            _ => {
                let z = tagged(Category::Adapters, || Tensor::zeros(&[n], DType::F32).to_device(device))?;
                Moments::Device(Box::new(DeviceMoments { m: z.clone(), v: z }))
            }
        })
    }

    fn len(&self) -> usize {
        match self {
            Moments::Host { m, .. } => m.len(),
            Moments::Device(d) => d.m.elem_count(),
            Moments::Paged(p) => p[0].shape().iter().product(),
        }
    }

    /// (exp_avg, exp_avg_sq) on the host: the checkpoint format is f64 whatever the device, so CPU and GPU
    /// checkpoints are interchangeable (f32 moments widen exactly).
    fn to_host(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok(match self {
            Moments::Host { m, v } => (m.clone(), v.clone()),
            Moments::Device(d) => (d.m.try_to_vec::<f64>()?, d.v.try_to_vec::<f64>()?),
            Moments::Paged(p) => (p[0].restore()?.try_to_vec::<f64>()?, p[1].restore()?.try_to_vec::<f64>()?),
        })
    }

    /// Starts bringing paged moments back (the copies run while earlier parameters update).
    fn prefetch(&self) -> Result<()> {
        if let Moments::Paged(p) = self {
            p.iter().try_for_each(Offloaded::prefetch)?;
        }
        Ok(())
    }

    /// Paged moments back on the device, as device moments.
    fn page_in(&mut self) -> Result<()> {
        if let Moments::Paged(p) = self {
            let [m, v] = tagged(Category::Adapters, || Ok::<_, Error>([p[0].restore()?, p[1].restore()?]))?;
            *self = Moments::Device(Box::new(DeviceMoments { m, v }));
        }
        Ok(())
    }

    /// Device moments parked in pinned host memory; their device copies go at [`Moments::release`].
    fn page_out(&mut self) -> Result<()> {
        if let Moments::Device(d) = self {
            *self = Moments::Paged(Box::new([Offloaded::new(&d.m)?, Offloaded::new(&d.v)?]));
        }
        Ok(())
    }

    fn release(&self) -> Result<()> {
        if let Moments::Paged(p) = self {
            p.iter().try_for_each(Offloaded::release)?;
        }
        Ok(())
    }

    /// Replaces the values, keeping where they live (a GPU rounds them to f32).
    fn set(&mut self, exp_avg: &[f64], exp_avg_sq: &[f64]) -> Result<()> {
        let paged = matches!(self, Moments::Paged(_));
        if paged {
            self.page_in()?;
        }
        match self {
            Moments::Host { m, v } => {
                m.clone_from_slice(exp_avg);
                v.clone_from_slice(exp_avg_sq);
            }
            Moments::Device(d) => {
                let device = d.m.device();
                let upload = |x: &[f64]| Tensor::from_slice(x, &[x.len()])?.to_dtype(DType::F32).to_device(device);
                (d.m, d.v) = (upload(exp_avg)?, upload(exp_avg_sq)?);
            }
            Moments::Paged(_) => unreachable!("paged in above"),
        }
        if paged {
            self.page_out()?;
            self.release()?;
        }
        Ok(())
    }
}

pub struct AdamW {
    config: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
    paged: bool,
}

impl AdamW {
    /// Frozen parameters are refused: an optimizer over them is a configuration mistake worth hearing about.
    pub fn new(params: Vec<Param>, config: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for p in params {
            if !p.is_trainable() {
                return Err(Error::invalid("AdamW", format!("parameter {} is frozen", p.name())));
            }
            let value = p.value();
            let moments = Moments::zeros(value.elem_count(), value.device())?;
            slots.push(Slot { param: p, moments });
        }
        Ok(AdamW { config, slots, step: 0, paged: false })
    }

    /// Pages GPU moments to pinned host memory between updates (true) or keeps them on the device (false, the
    /// default); the updates are the same bits either way. CPU moments are host memory already.
    pub fn set_paged(&mut self, paged: bool) -> Result<()> {
        self.paged = paged;
        self.slots.iter().try_for_each(|s| s.moments.prefetch())?;
        for slot in &mut self.slots {
            if paged {
                slot.moments.page_out()?;
            } else {
                slot.moments.page_in()?;
            }
        }
        self.slots.iter().try_for_each(|s| s.moments.release())
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// Updates taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.slots.iter().map(|s| &s.param)
    }

    /// One update from the accumulated gradients (a parameter with no gradient is skipped, as torch does), then
    /// clears them for the next accumulation.
    pub fn step(&mut self) -> Result<()> {
        self.update(None)
    }

    /// The squared global norm of the accumulated gradients, where they are: [`GradNorm::Host`] (f64, exact) for
    /// parameters on the CPU, [`GradNorm::Device`] (an f32 scalar on their GPU, not read back) otherwise.
    pub fn grad_norm_sq(&self) -> Result<GradNorm> {
        let device = self.slots.first().map_or(Device::Cpu, |s| s.param.value().device());
        if device == Device::Cpu {
            let params: Vec<Param> = self.params().cloned().collect();
            return Ok(GradNorm::Host(sum_squares_of(&params)?));
        }
        let mut acc = Tensor::zeros_on(&[], DType::F32, device)?;
        let grads: Vec<Tensor> = self.slots.iter().filter_map(|s| s.param.grad()).collect();
        sum_squares_multi_into(&grads.iter().collect::<Vec<_>>(), &mut acc)?;
        Ok(GradNorm::Device(acc))
    }

    /// [`AdamW::step`] on the gradients clipped to a global norm of `max_norm` (∞: none) as
    /// torch.nn.utils.clip_grad_norm_ does, from `norm` as [`AdamW::grad_norm_sq`] gave it: on the host the
    /// gradients are scaled first (as [`clip_grad_norm`]); on a GPU the update kernel scales them by the device norm.
    pub fn step_clipped(&mut self, norm: &GradNorm, max_norm: f64) -> Result<()> {
        match norm {
            GradNorm::Host(sq) => {
                let params: Vec<Param> = self.params().cloned().collect();
                clip_to(&params, sq.sqrt(), max_norm)?;
                self.update(None)
            }
            GradNorm::Device(sq) if max_norm.is_finite() => self.update(Some((sq, max_norm))),
            GradNorm::Device(_) => self.update(None),
        }
    }

    fn update(&mut self, clip: Option<(&Tensor, f64)>) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let h = AdamWStep {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
        };
        if !self.paged && self.slots.iter().all(|s| matches!(s.moments, Moments::Device(_))) {
            return self.update_together(&h, clip);
        }
        // Paged: every copy back is queued before the first update waits for its own.
        self.slots.iter().try_for_each(|s| s.moments.prefetch())?;
        for slot in &mut self.slots {
            slot.moments.page_in()?;
            let Some(g) = update_grad(&slot.param)? else { continue };
            let value = slot.param.value();
            match &mut slot.moments {
                Moments::Host { m, v } => {
                    debug_assert!(clip.is_none(), "host parameters are clipped on the host before the update");
                    let g = g.to_vec::<f64>();
                    let mut p = value.to_vec::<f64>();
                    adamw_step(&h, &mut p, &g, m, v);
                    slot.param.set_value(Tensor::from_vec(p, value.shape())?.to_dtype(value.dtype()));
                }
                Moments::Device(d) => {
                    // Drop our handle first so the update writes the parameter's buffer in place instead of copying.
                    drop(value);
                    slot.param
                        .update(|p| qlora_runtime::ops::optim::adamw_step(&h, p, &g, &mut d.m, &mut d.v, clip))?;
                }
                Moments::Paged(_) => unreachable!("paged in above"),
            }
            slot.param.zero_grad();
        }
        if self.paged {
            // Every copy out is queued before the compute stream waits for any of them.
            for slot in &mut self.slots {
                slot.moments.page_out()?;
            }
            self.slots.iter().try_for_each(|s| s.moments.release())?;
        }
        Ok(())
    }

    /// [`AdamW::update`] of parameters whose moments are on their GPU, all of them in one launch there
    /// (`adamw_step_multi`; the same update of each element as one launch per parameter).
    fn update_together(&mut self, h: &AdamWStep, clip: Option<(&Tensor, f64)>) -> Result<()> {
        let (mut params, mut grads, mut ms, mut vs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for Slot { param, moments } in &mut self.slots {
            let Some(g) = update_grad(param)? else { continue };
            let Moments::Device(d) = moments else { unreachable!("checked by the caller: moments on the device") };
            params.push(&*param);
            grads.push(g);
            ms.push(&mut d.m);
            vs.push(&mut d.v);
        }
        let grad_refs: Vec<&Tensor> = grads.iter().collect();
        Param::update_all(&params, |values| {
            qlora_runtime::ops::optim::adamw_step_multi(h, values, &grad_refs, &mut ms, &mut vs, clip)
        })?;
        params.iter().for_each(|p| p.zero_grad());
        Ok(())
    }

    pub fn zero_grad(&self) {
        self.slots.iter().for_each(|s| s.param.zero_grad());
    }

    /// The moments and step count, by parameter name: with the parameters' values, everything a resumed run
    /// needs to continue (bit for bit on the CPU). GPU moments are downloaded.
    pub fn state(&self) -> Result<AdamWState> {
        let moments = self
            .slots
            .iter()
            .map(|s| {
                let (exp_avg, exp_avg_sq) = s.moments.to_host()?;
                Ok(ParamMoments { name: s.param.name().to_string(), exp_avg, exp_avg_sq })
            })
            .collect::<Result<_>>()?;
        Ok(AdamWState { step: self.step, moments })
    }

    /// Restores a [`AdamW::state`] taken from an optimizer over the same parameters (matched by name, in any
    /// order). On error (a parameter missing or extra, a length mismatch) nothing is changed.
    pub fn load_state(&mut self, state: &AdamWState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(Error::invalid(
                "AdamW state",
                format!("holds moments for {} parameters; the optimizer has {}", state.moments.len(), self.slots.len()),
            ));
        }
        let mut found = Vec::with_capacity(self.slots.len());
        for slot in &self.slots {
            let name = slot.param.name();
            let m = state
                .moments
                .iter()
                .find(|m| m.name == name)
                .ok_or_else(|| Error::invalid("AdamW state", format!("has no moments for parameter {name}")))?;
            let n = slot.moments.len();
            if m.exp_avg.len() != n || m.exp_avg_sq.len() != n {
                return Err(Error::shape(
                    "AdamW state",
                    format!("{name}: moments of {} and {} elements for {n}", m.exp_avg.len(), m.exp_avg_sq.len()),
                ));
            }
            found.push(m);
        }
        for (slot, m) in self.slots.iter_mut().zip(found) {
            slot.moments.set(&m.exp_avg, &m.exp_avg_sq)?;
        }
        self.step = state.step;
        Ok(())
    }
}

/// An [`AdamW`]'s resumable state, named as torch's `optimizer.state_dict()` names the moments.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// Updates taken (the bias-correction step of the next update is this + 1).
    pub step: u64,
    pub moments: Vec<ParamMoments>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ParamMoments {
    pub name: String,
    pub exp_avg: Vec<f64>,
    pub exp_avg_sq: Vec<f64>,
}

/// The squared global norm of the gradients where [`AdamW::grad_norm_sq`] computed it.
#[derive(Clone, Debug)]
pub enum GradNorm {
    /// f64, summed on the host (CPU parameters: exact and bit-reproducible).
    Host(f64),
    /// A one-element f32 tensor on the parameters' GPU: read it (with the loss, in one synchronisation) only to log
    /// or check it.
    Device(Tensor),
}

/// `param`'s gradient for an update, checked against its value's length (None: no gradient, no update, as torch).
fn update_grad(param: &Param) -> Result<Option<Tensor>> {
    let Some(g) = param.grad() else { return Ok(None) };
    let n = param.value().elem_count();
    if g.elem_count() != n {
        return Err(Error::shape(
            "AdamW",
            format!("{}: gradient {} vs value {n} elements", param.name(), g.elem_count()),
        ));
    }
    Ok(Some(g))
}

/// Σ over the parameters' gradients of Σ g², in f64.
fn sum_squares_of(params: &[Param]) -> Result<f64> {
    let mut sq = 0.0;
    for p in params {
        if let Some(g) = p.grad() {
            sq += sum_squares(&g)?;
        }
    }
    Ok(sq)
}

/// Scales every gradient so their global L2 norm is at most `max_norm`; returns the norm before clipping
/// (what training logs report). A non-finite norm is returned unscaled so the caller can stop on it.
pub fn clip_grad_norm(params: &[Param], max_norm: f64) -> Result<f64> {
    let norm = sum_squares_of(params)?.sqrt();
    clip_to(params, norm, max_norm)?;
    Ok(norm)
}

/// Scales the gradients by max_norm / (norm + 1e-6) when the finite `norm` exceeds `max_norm`.
fn clip_to(params: &[Param], norm: f64, max_norm: f64) -> Result<()> {
    if norm.is_finite() && norm > max_norm {
        // torch.nn.utils.clip_grad_norm_ adds 1e-6 to the denominator.
        let factor = max_norm / (norm + 1e-6);
        for p in params {
            p.scale_grad(factor)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_autograd::Tape;
    use qlora_runtime::DType;

    fn quadratic_grad(p: &Param, target: &[f64]) {
        let tape = Tape::new();
        let v = tape.param(p);
        let t = qlora_autograd::Var::constant(Tensor::from_slice(target, &[target.len()]).unwrap());
        let d = tape.add(&v, &tape.scale(&t, -1.0).unwrap()).unwrap();
        let loss = tape.sum(&tape.mul(&d, &d).unwrap()).unwrap();
        tape.backward(&loss).unwrap();
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let p = Param::trainable("p", Tensor::zeros(&[3], DType::F32));
        let target = [1.0, -2.0, 0.5];
        let mut opt = AdamW::new(vec![p.clone()], AdamWConfig { lr: 0.05, ..Default::default() }).unwrap();
        for _ in 0..400 {
            quadratic_grad(&p, &target);
            opt.step().unwrap();
        }
        let got = p.value().to_vec::<f64>();
        assert!(got.iter().zip(target).all(|(a, b)| (a - b).abs() < 1e-2), "{got:?}");
        assert!(p.grad().is_none(), "step clears gradients");
        assert_eq!(p.value().dtype(), DType::F32, "dtype kept");
    }

    #[test]
    fn state_round_trip_continues_bit_for_bit() {
        let target = [1.0, -2.0, 0.5];
        let fresh = || Param::trainable("p", Tensor::zeros(&[3], DType::F32));
        let config = AdamWConfig { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        let (p, q) = (fresh(), fresh());
        let mut a = AdamW::new(vec![p.clone()], config).unwrap();
        for _ in 0..5 {
            quadratic_grad(&p, &target);
            a.step().unwrap();
        }
        // A second optimizer picks up from the first one's state and values.
        let mut b = AdamW::new(vec![q.clone()], config).unwrap();
        q.set_value(p.value());
        b.load_state(&a.state().unwrap()).unwrap();
        assert_eq!(b.steps_taken(), 5);
        for _ in 0..5 {
            quadratic_grad(&p, &target);
            a.step().unwrap();
            quadratic_grad(&q, &target);
            b.step().unwrap();
        }
        assert_eq!(p.value().to_vec::<f32>(), q.value().to_vec::<f32>());
        assert_eq!(a.state().unwrap(), b.state().unwrap());

        let mut wrong = a.state().unwrap();
        wrong.moments[0].name = "other".into();
        let e = b.load_state(&wrong).unwrap_err().to_string();
        assert!(e.contains("no moments for parameter p"), "{e}");
        let mut short = a.state().unwrap();
        short.moments[0].exp_avg.pop();
        assert!(b.load_state(&short).unwrap_err().to_string().contains("p: moments of 2 and 3"));
        assert_eq!(b.state().unwrap(), a.state().unwrap(), "a refused state changes nothing");
    }

    #[test]
    fn frozen_params_are_refused() {
        assert!(AdamW::new(vec![Param::frozen("w", Tensor::zeros(&[1], DType::F32))], AdamWConfig::default()).is_err());
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Param::trainable("p", Tensor::from_vec(vec![0.0f32, 0.0], &[2]).unwrap());
        quadratic_grad(&p, &[3.0, 4.0]); // gradient 2(p − t) = (−6, −8), norm 10
        let norm = clip_grad_norm(std::slice::from_ref(&p), 1.0).unwrap();
        assert!((norm - 10.0).abs() < 1e-6);
        let g = p.grad().unwrap().to_vec::<f64>();
        assert!(((g[0] * g[0] + g[1] * g[1]).sqrt() - 1.0).abs() < 1e-5, "{g:?}");
        assert!((g[0] / g[1] - 0.75).abs() < 1e-6, "direction kept");
    }
}
