//! Optimizer updates in place, on the parameter's device.

use crate::cuda::{buf, buffer_mut, Gpu};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::adamw::AdamWStep;
use qlora_kernels::cuda::adamw as gadamw;

/// p, g: \[n\] f32 or bf16 (g is cast to p's dtype), m, v: \[n\] f32 → p, m, v updated in place (decoupled weight
/// decay, then the Adam step: `qlora_kernels::adamw::adamw_step`). On the CPU the update runs in f32, like the
/// CUDA kernel; an optimizer wanting f64 moments on the host calls the kernel directly.
///
/// `clip`: (the squared global gradient norm, a one-element f32 tensor on p's device; max_norm): g is first scaled
/// by `qlora_kernels::adamw::clip_factor` of it, inside the kernel on CUDA, so the norm never goes to the host.
pub fn adamw_step(
    h: &AdamWStep,
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    const OP: &str = "adamw_step";
    let n = p.elem_count();
    for (what, t) in [("gradient", g), ("exp_avg", &*m), ("exp_avg_sq", &*v)] {
        if t.elem_count() != n {
            return Err(Error::shape(OP, format!("{what} of {} elements for a parameter of {n}", t.elem_count())));
        }
    }
    for t in [&*m, &*v] {
        if t.dtype() != DType::F32 {
            return Err(Error::DType { op: OP, expected: DType::F32, got: t.dtype() });
        }
    }
    if h.step == 0 {
        return Err(Error::invalid(OP, "the step count starts at 1 (bias correction divides by 1 − β^step)"));
    }
    if let Some((norm_sq, _)) = clip {
        if norm_sq.elem_count() != 1 || norm_sq.dtype() != DType::F32 || norm_sq.device() != p.device() {
            return Err(Error::invalid(OP, "the squared gradient norm must be one f32 on the parameter's device"));
        }
    }
    if let Some(gpu) = Gpu::of(OP, &[&*p, g, &*m, &*v])? {
        let g = gpu.input_as(g, p.dtype())?;
        let norm = clip.map(|(n, max)| gpu.input_as(n, DType::F32).map(|n| (n, max as f32))).transpose()?;
        let clip = norm.as_ref().map(|(n, max)| (buf::<f32>(n), *max));
        let (m, v) = (buffer_mut::<f32>(OP, m)?, buffer_mut::<f32>(OP, v)?);
        return match p.dtype() {
            DType::BF16 => gpu.run(gadamw::adamw_step(h, buffer_mut::<half::bf16>(OP, p)?, buf(&g), m, v, clip)),
            _ => gpu.run(gadamw::adamw_step(h, buffer_mut::<f32>(OP, p)?, buf(&g), m, v, clip)),
        };
    }
    let dtype = p.dtype();
    if !dtype.is_float() || !g.dtype().is_float() {
        return Err(Error::DType {
            op: OP,
            expected: DType::F32,
            got: if dtype.is_float() { g.dtype() } else { dtype },
        });
    }
    let mut pv = p.to_vec::<f32>();
    let mut gv = g.to_vec::<f32>();
    if let Some((norm_sq, max_norm)) = clip {
        let factor = qlora_kernels::adamw::clip_factor(norm_sq.to_scalar::<f32>()?, max_norm as f32);
        gv.iter_mut().for_each(|x| *x *= factor);
    }
    let (mut mv, mut vv) = (m.to_vec::<f32>(), v.to_vec::<f32>());
    qlora_kernels::adamw::adamw_step(h, &mut pv, &gv, &mut mv, &mut vv);
    *p = Tensor::from_vec(pv, p.shape())?.to_dtype(dtype);
    *m = Tensor::from_vec(mv, m.shape())?;
    *v = Tensor::from_vec(vv, v.shape())?;
    Ok(())
}

/// [`adamw_step`] of many parameters: `params[i]` with `grads[i]` and its moments `ms[i]`, `vs[i]`. Where every
/// tensor is f32 on one GPU, one launch updates them all (`adamw_multi`, the same update of each element, so the same
/// bits as a launch per parameter); otherwise each takes [`adamw_step`].
pub fn adamw_step_multi(
    h: &AdamWStep,
    params: &mut [&mut Tensor],
    grads: &[&Tensor],
    ms: &mut [&mut Tensor],
    vs: &mut [&mut Tensor],
    clip: Option<(&Tensor, f64)>,
) -> Result<()> {
    const OP: &str = "adamw_step_multi";
    let count = params.len();
    if grads.len() != count || ms.len() != count || vs.len() != count {
        return Err(Error::invalid(OP, "one gradient and two moments per parameter"));
    }
    let all: Vec<&Tensor> = params
        .iter()
        .map(|p| &**p)
        .chain(grads.iter().copied())
        .chain(ms.iter().chain(vs.iter()).map(|t| &**t))
        .collect();
    let device = all.first().map(|t| t.device());
    let one_gpu = matches!(device, Some(crate::Device::Cuda(_)))
        && all.iter().all(|t| Some(t.device()) == device && t.dtype() == DType::F32 && t.is_contiguous());
    let shapes_agree = (0..count).all(|i| {
        let n = params[i].elem_count();
        grads[i].elem_count() == n && ms[i].elem_count() == n && vs[i].elem_count() == n
    });
    if !(one_gpu && shapes_agree) || h.step == 0 {
        // The single update checks each operand and names what is wrong.
        for i in 0..count {
            adamw_step(h, params[i], grads[i], ms[i], vs[i], clip)?;
        }
        return Ok(());
    }
    let gpu = Gpu::of(OP, &all)?.expect("checked: on a GPU");
    let norm = match clip {
        Some((n, max)) if n.elem_count() == 1 && n.dtype() == DType::F32 && n.device() == params[0].device() => {
            Some((gpu.input_as(n, DType::F32)?, max as f32))
        }
        Some(_) => {
            return Err(Error::invalid(OP, "the squared gradient norm must be one f32 on the parameters' device"))
        }
        None => None,
    };
    let grads: Vec<Tensor> = grads.iter().map(|g| gpu.input_as(g, DType::F32)).collect::<Result<_>>()?;
    let mut buffers = Vec::with_capacity(count);
    for ((p, m), v) in params.iter_mut().zip(ms.iter_mut()).zip(vs.iter_mut()) {
        buffers.push((buffer_mut::<f32>(OP, p)?, buffer_mut::<f32>(OP, m)?, buffer_mut::<f32>(OP, v)?));
    }
    let mut multi: Vec<gadamw::MultiParam> = buffers
        .into_iter()
        .zip(&grads)
        .map(|((p, m, v), g)| gadamw::MultiParam { p, g: buf::<f32>(g), m, v })
        .collect();
    gpu.run(gadamw::adamw_multi(h, &mut multi, norm.as_ref().map(|(n, max)| (buf::<f32>(n), *max))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_branch_is_the_f32_kernel_and_checks_its_operands() {
        let h = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 1 };
        let (p0, g) = (vec![1.0f32, -2.0, 0.5], vec![0.3f32, -0.1, 2.0]);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; 3], vec![0.0f32; 3]);
        qlora_kernels::adamw::adamw_step(&h, &mut p, &g, &mut m, &mut v);

        let t = |x: &[f32]| Tensor::from_slice(x, &[x.len()]).unwrap();
        let (mut tp, tg, mut tm, mut tv) = (t(&p0), t(&g), t(&[0.0; 3]), t(&[0.0; 3]));
        adamw_step(&h, &mut tp, &tg, &mut tm, &mut tv, None).unwrap();
        assert_eq!((tp.to_vec::<f32>(), tm.to_vec::<f32>(), tv.to_vec::<f32>()), (p, m, v));

        assert!(adamw_step(&h, &mut tp, &t(&[1.0]), &mut tm, &mut tv, None)
            .unwrap_err()
            .to_string()
            .contains("gradient"));
        let mut bf = tm.to_dtype(DType::BF16);
        assert!(adamw_step(&h, &mut tp, &tg, &mut bf, &mut tv, None).is_err(), "moments are f32");
        let h0 = AdamWStep { step: 0, ..h };
        assert!(adamw_step(&h0, &mut tp, &tg, &mut tm, &mut tv, None).is_err(), "steps count from 1");
    }

    #[test]
    fn many_parameters_update_as_each_alone_and_are_checked() {
        let h = AdamWStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 2 };
        let t = |x: &[f32]| Tensor::from_slice(x, &[x.len()]).unwrap();
        let (p0, g) = ([t(&[1.0, -2.0, 0.5]), t(&[4.0])], [t(&[0.3, -0.1, 2.0]), t(&[-1.0])]);
        let moments = || [t(&[0.1, 0.2, 0.3]), t(&[0.4])];
        let (mut ps, mut ms, mut vs) = (p0.clone(), moments(), moments());
        {
            let mut p_refs: Vec<&mut Tensor> = ps.iter_mut().collect();
            let (mut m_refs, mut v_refs): (Vec<_>, Vec<_>) = (ms.iter_mut().collect(), vs.iter_mut().collect());
            adamw_step_multi(&h, &mut p_refs, &[&g[0], &g[1]], &mut m_refs, &mut v_refs, None).unwrap();
        }
        for i in 0..2 {
            let (mut p, mut m, mut v) = (p0[i].clone(), moments()[i].clone(), moments()[i].clone());
            adamw_step(&h, &mut p, &g[i], &mut m, &mut v, None).unwrap();
            assert_eq!(ps[i].to_vec::<f32>(), p.to_vec::<f32>(), "parameter {i}");
            assert_eq!((ms[i].to_vec::<f32>(), vs[i].to_vec::<f32>()), (m.to_vec::<f32>(), v.to_vec::<f32>()));
        }
        let (mut p, mut m, mut v) = (p0.clone(), moments(), moments());
        let mut p_refs: Vec<&mut Tensor> = p.iter_mut().collect();
        let (mut m_refs, mut v_refs): (Vec<_>, Vec<_>) = (m.iter_mut().collect(), v.iter_mut().collect());
        let e = adamw_step_multi(&h, &mut p_refs, &[&g[0]], &mut m_refs, &mut v_refs, None).unwrap_err();
        assert!(e.to_string().contains("one gradient and two moments per parameter"), "{e}");
        let e = adamw_step_multi(&h, &mut p_refs, &[&g[1], &g[0]], &mut m_refs, &mut v_refs, None).unwrap_err();
        assert!(e.to_string().contains("gradient"), "a gradient of the wrong length is named: {e}");
    }
}
