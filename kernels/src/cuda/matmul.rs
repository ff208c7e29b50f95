//! Dense GEMM through cuBLASLt, twin of [`crate::matmul::matmul`] with the same [`Gemm`] (row-major, batch strides
//! in elements, stride 0 broadcasting one matrix, offsets and leading dimensions for blocks of wider matrices, beta == 0
//! never reading C). f32 computes in true f32 (`CUBLAS_COMPUTE_32F`, not TF32: the CPU twin is the specification);
//! bf16 has bf16 I/O and f32 accumulation.
//!
//! cuBLASLt is column-major, and a row-major [r, c] matrix is the column-major [c, r] transpose, so
//! C = op(A)·op(B) is computed as Cᵀ = op(B)ᵀ·op(A)ᵀ: B is cuBLASLt's A, A its B, and the shapes swap m and n.
//! The k == 0 and alpha == 0 products, which cuBLASLt does not take and which read neither A nor B, scale C with
//! `kernels/cuda/matmul.cu` instead, and so do products of a few rows of A with a long k against a transposed B
//! (decoding's LoRA x·Aᵀ), which cuBLASLt runs as a split-k kernel and a reduction: `gemm_few_rows` is one launch.
//!
//! Plans: the descriptors of a product and the algorithm cuBLASLt's heuristic picks for it are made once per shape,
//! layout, type and operand alignment and kept by the device's `BlasLt`, so a training step, which repeats the same
//! few dozen products, pays one `cublasLtMatmul` call per GEMM ([`plan_count`] reports them).

use super::alloc::Block;
use super::source::Module;
use super::{
    aligned16, config, grid_for, kernel, launch, same_device, u32_arg, CudaDevice, DeviceBuffer, Error, GpuFloat,
    Result,
};
use crate::activation::Glu;
use crate::matmul::{check_ab, check_c, Gemm};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys;
use cudarc::driver::LaunchConfig;
use std::collections::hash_map::{Entry, HashMap};
use std::ffi::c_void;
use std::sync::Mutex;

/// a: [batch, op(A) stored], b: [batch, op(B) stored], c: [batch, m, n] → c = alpha·op(A)·op(B) + beta·c (see
/// [`Gemm`]: offsets and leading dimensions included). Panics on the shape errors the CPU twin panics on.
pub fn matmul<T: GpuFloat>(g: &Gemm, a: &DeviceBuffer<T>, b: &DeviceBuffer<T>, c: &mut DeviceBuffer<T>) -> Result<()> {
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 {
        return Ok(());
    }
    // Owned, so that c can be lent mutably below.
    let dev = &same_device("matmul", &[a.device(), b.device(), c.device()]).clone();
    check_c(g, c.len());
    if m * n == 0 {
        return Ok(());
    }
    let stride_c = g.stride_c_used();
    let bytes = size_of::<T>() as u64;
    let at = |buf: u64, offset: usize| buf + offset as u64 * bytes;
    if k == 0 || g.alpha == 0.0 {
        return scale_c::<T>(dev, g, at(c.ptr(), g.offset_c));
    }
    check_ab(g, a.len(), b.len());
    let (pa, pb, pc) = (at(a.ptr(), g.offset_a), at(b.ptr(), g.offset_b), at(c.ptr(), g.offset_c));
    if takes_few_rows(g, pa, pb) {
        return few_rows::<T>(dev, g, pa, pb, pc);
    }
    let blas = dev.blas_lt()?;
    let all = Product { g: *g, batch: g.batch, a: pa, b: pb, c: pc, stride_c };
    match blas.run::<T>(dev, &all) {
        // Some strides (0 to broadcast, or ones that misalign every other entry) leave cuBLASLt no batched algorithm;
        // entry by entry it always has one.
        Err(Error::Cublas { source: CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED), .. })
            if g.batch > 1 =>
        {
            (0..g.batch).try_for_each(|i| {
                let one = Product {
                    batch: 1,
                    a: at(all.a, i * g.stride_a),
                    b: at(all.b, i * g.stride_b),
                    c: at(all.c, i * stride_c),
                    ..all
                };
                blas.run::<T>(dev, &one)
            })
        }
        r => r,
    }
}

/// Products planned on `dev` so far: descriptors and algorithms cached, each reused by every later product of the same
/// shape, layout, type and alignment (a repeated product adds none). Makes the device's cuBLASLt handle if needed.
pub fn plan_count(dev: &CudaDevice) -> Result<usize> {
    Ok(dev.blas_lt()?.plan_count())
}

/// C = beta·C over every batch entry (zeros when beta == 0, without reading C), C starting at device address `c`:
/// one launch over all entries when their rows are packed, one per entry and row block otherwise.
fn scale_c<T: GpuFloat>(dev: &CudaDevice, g: &Gemm, c: u64) -> Result<()> {
    if g.beta == 1.0 {
        return Ok(());
    }
    let (ldc, mn) = (g.lds().2, g.m * g.n);
    let launch_rows = |ptr: u64, batch: usize, len: usize, stride: usize| {
        let kernel = kernel!("gemm_scale_c", T);
        let (beta, batch64, len64, stride64) = (g.beta as f32, batch as u64, len as u64, stride as u64);
        // SAFETY: gemm_scale_c_T(T* c, float beta, u64 batch, u64 mn, u64 stride_c) touches ptr[i·stride + j] for
        // i < batch, j < len: with the arguments below, exactly the elements of C's batch entries, which `check_c`
        // asserted lie inside the buffer; on this device.
        unsafe {
            launch!(dev, Module::Matmul, kernel, config(grid_for(batch * len)); ptr, beta, batch64, len64, stride64)
        }
    };
    if ldc == g.n {
        return launch_rows(c, g.batch, mn, g.stride_c_used());
    }
    // Rows with gaps between them: each row of each entry is one "batch entry" of the kernel.
    let bytes = size_of::<T>() as u64;
    (0..g.batch).try_for_each(|i| launch_rows(c + (i * g.stride_c_used()) as u64 * bytes, g.m, g.n, ldc))
}

/// Rows of A [`few_rows`] takes at most (the largest M of `gemm_few_rows` in matmul.cu): a decoding step's tokens.
const FEW_ROWS: usize = 8;
/// Columns of C past which cuBLASLt's tiles beat a block per column (the LoRA products it is for have r·3 ≤ 384).
const FEW_ROWS_MAX_N: usize = 1024;
/// The k from which cuBLASLt splits k and adds a reduction kernel for such products.
const FEW_ROWS_MIN_K: usize = 256;
/// Threads per block of `gemm_few_rows` (`GEMM_FEW_ROWS_WARPS` warps in matmul.cu).
const FEW_ROWS_THREADS: u32 = 512;

/// Whether `g` (A, B at device addresses `a`, `b`) is a product of a few rows against a transposed B with a long k,
/// vector-aligned: what `gemm_few_rows` computes in one launch where cuBLASLt takes two (split-k and its reduction).
fn takes_few_rows(g: &Gemm, a: u64, b: u64) -> bool {
    let (lda, ldb, _) = g.lds();
    g.batch == 1
        && !g.trans_a
        && g.trans_b
        && few_rows_shape(g.m, g.n, g.k)
        && [lda, ldb].iter().all(|v| v % 8 == 0)
        && aligned16(&[a, b])
}

/// The shapes (m rows of A, n columns of C, k) of the products `gemm_few_rows` computes.
fn few_rows_shape(m: usize, n: usize, k: usize) -> bool {
    (1..=FEW_ROWS).contains(&m) && n <= FEW_ROWS_MAX_N && k >= FEW_ROWS_MIN_K && k % 8 == 0
}

/// Whether [`glu_few_rows`] takes gate and up of \[m, k\] against b of \[n, k\] (all 16-byte aligned), so that a
/// caller allocates its outputs only then: `gemm_few_rows`' shapes up to k = 8192 (`GLU_FEW_ROWS_MAX_K`).
pub fn takes_glu_few_rows(m: usize, n: usize, k: usize) -> bool {
    n > 0 && few_rows_shape(m, n, k) && k <= GLU_FEW_ROWS_MAX_K
}

/// The longest rows [`glu_few_rows`] takes. Its n blocks (r = 16 of them for one adapter) each form the whole GLU, k/512
/// exponentials a thread: at the 1B's k = 8192 that cost less than the GLU's own launch (decoding 0.95× the device
/// time per token), at the 8B's 14336 more (1.015×; H100, 2026-12-07).
const GLU_FEW_ROWS_MAX_K: usize = 8192;

/// C = alpha·A·Bᵀ + beta·C for a product [`takes_few_rows`] accepts, A, B, C at these device addresses: one block per
/// column of C.
fn few_rows<T: GpuFloat>(dev: &CudaDevice, g: &Gemm, a: u64, b: u64, c: u64) -> Result<()> {
    let (lda, ldb, ldc) = g.lds();
    let cfg = LaunchConfig { grid_dim: (g.n as u32, 1, 1), block_dim: (FEW_ROWS_THREADS, 1, 1), shared_mem_bytes: 0 };
    // The kernels for 1, 2, 4 and 8 rows of A; rows past m re-read row m - 1 and are not written.
    let kernel = match g.m.next_power_of_two() {
        1 => kernel!("gemm_few_rows_m1", T),
        2 => kernel!("gemm_few_rows_m2", T),
        4 => kernel!("gemm_few_rows_m4", T),
        _ => kernel!("gemm_few_rows_m8", T),
    };
    let (lda, ldb, ldc, m, k) = (lda as u64, ldb as u64, ldc as u64, g.m as u32, u32_arg("matmul: k", g.k));
    let (alpha, beta) = (g.alpha as f32, g.beta as f32);
    // SAFETY: gemm_few_rows_m{1,2,4,8}_T(const T* a, u64 lda, const T* b, u64 ldb, T* c, u64 ldc, unsigned m,
    // unsigned k, float alpha, float beta) reads a[r·lda + i] (r < m ≤ 8, rows past m clamped to m - 1; i < k) and
    // b[j·ldb + i] (j < n, the grid), and touches c[r·ldc + j] for r < m: inside the buffers (check_ab, check_c), on
    // this device; k, lda, ldb multiples of 8 and a, b 16-byte aligned (takes_few_rows), so every 8-element vector
    // load is aligned; blocks of 512 threads (the kernel's 16 warps of partial sums).
    unsafe { launch!(dev, Module::Matmul, kernel, cfg; a, lda, b, ldb, c, ldc, m, k, alpha, beta) }
}

/// gate, up: \[m, k\], b: \[n, k\] → x = act(gate) ⊙ up (\[m, k\], [`crate::activation::glu_forward`]'s values) and
/// c = x·bᵀ (\[m, n\]), all packed, in one launch: the GLU's own launch and the product's read of x become one
/// (decoding's U = x·Aᵀ for down_proj's adapter). Only where `gemm_few_rows` would take x·bᵀ ([`takes_glu_few_rows`],
/// and 16-byte aligned buffers); elsewhere it returns false with nothing written, and the caller runs the two.
pub fn glu_few_rows<T: GpuFloat>(
    kind: Glu,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    b: &DeviceBuffer<T>,
    x: &mut DeviceBuffer<T>,
    c: &mut DeviceBuffer<T>,
    (m, n, k): (usize, usize, usize),
) -> Result<bool> {
    let dev = same_device("glu_few_rows", &[gate.device(), up.device(), b.device(), x.device(), c.device()]).clone();
    for (what, len, want) in
        [("gate", gate.len(), m * k), ("up", up.len(), m * k), ("b", b.len(), n * k), ("x", x.len(), m * k)]
    {
        assert!(len >= want, "glu_few_rows: {what} holds {len} elements, [{m}, {n}, {k}] needs {want}");
    }
    assert!(c.len() >= m * n, "glu_few_rows: c holds {} elements, [{m}, {n}] needs {}", c.len(), m * n);
    if !(takes_glu_few_rows(m, n, k) && aligned16(&[gate.ptr(), up.ptr(), b.ptr(), x.ptr()])) {
        return Ok(false);
    }
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (FEW_ROWS_THREADS, 1, 1), shared_mem_bytes: 0 };
    let kernel = match (kind, m.next_power_of_two()) {
        (Glu::SwiGlu, 1) => kernel!("swiglu_few_rows_m1", T),
        (Glu::SwiGlu, 2) => kernel!("swiglu_few_rows_m2", T),
        (Glu::SwiGlu, 4) => kernel!("swiglu_few_rows_m4", T),
        (Glu::SwiGlu, _) => kernel!("swiglu_few_rows_m8", T),
        (Glu::GeGlu, 1) => kernel!("geglu_few_rows_m1", T),
        (Glu::GeGlu, 2) => kernel!("geglu_few_rows_m2", T),
        (Glu::GeGlu, 4) => kernel!("geglu_few_rows_m4", T),
        (Glu::GeGlu, _) => kernel!("geglu_few_rows_m8", T),
    };
    let (m, n, k) = (m as u32, n as u32, u32_arg("glu_few_rows: k", k));
    // SAFETY: {swiglu,geglu}_few_rows_m{1,2,4,8}_T(const T* gate, const T* up, T* x, const T* b, T* c, unsigned m,
    // unsigned n, unsigned k) reads gate[r·k + i], up[r·k + i] (r < m ≤ 8, rows past m clamped to m − 1; i < k) and
    // b[j·k + i] (j < n, the grid), writes x[r·k + i] and c[r·n + j] for r < m: inside the buffers (asserted above),
    // on this device; k a multiple of 8 and gate, up, x, b 16-byte aligned (checked above), so every
    // 8-element vector access is aligned; blocks of 512 threads (gemm_few_rows' 16 warps of partial sums).
    unsafe {
        launch!(&dev, Module::Matmul, kernel, cfg; gate.ptr(), up.ptr(), x.ptr(), b.ptr(), c.ptr(), m, n, k)?;
    }
    Ok(true)
}

/// Whether [`norm_few_rows`] takes x of \[m, k\] against b of \[n, k\] (all 16-byte aligned): `gemm_few_rows`'
/// shapes with rows short enough that each thread's share of a row's Σ x² is one 8-value chunk, as in the norm
/// kernel's, so that the norm's bits are its bits.
pub fn takes_norm_few_rows(m: usize, n: usize, k: usize) -> bool {
    n > 0 && few_rows_shape(m, n, k) && k <= 8 * FEW_ROWS_THREADS as usize
}

/// x\[, residual\]: \[m, k\], weight: \[k\] → \[h = x + residual,\] y = rms_norm(h or x)·(offset + weight)
/// (\[m, k\], [`crate::cuda::rms_norm::rms_norm_forward`]'s values: `residual` and h go together) and c = y·bᵀ
/// (\[m, n\]), all packed, in one launch: the norm's own launch and the product's read of y become one (decoding's
/// U = y·Aᵀ for the adapters after a layer's norms). Where [`takes_norm_few_rows`] says no, or a buffer is not
/// 16-byte aligned, it returns false with nothing written, and the caller runs the two.
#[allow(clippy::too_many_arguments)]
pub fn norm_few_rows<T: GpuFloat>(
    x: &DeviceBuffer<T>,
    add: Option<(&DeviceBuffer<T>, &mut DeviceBuffer<T>)>,
    weight: &DeviceBuffer<T>,
    (eps, offset): (f32, f32),
    b: &DeviceBuffer<T>,
    y: &mut DeviceBuffer<T>,
    c: &mut DeviceBuffer<T>,
    (m, n, k): (usize, usize, usize),
) -> Result<bool> {
    // The residual and h as (device, length, address): read and written only through the kernel.
    let side: Vec<(&CudaDevice, usize, u64)> =
        add.iter().flat_map(|(r, h)| [(r.device(), r.len(), r.ptr()), (h.device(), h.len(), h.ptr())]).collect();
    let mut devices = vec![x.device(), weight.device(), b.device(), y.device(), c.device()];
    devices.extend(side.iter().map(|s| s.0));
    let dev = same_device("norm_few_rows", &devices).clone();
    let lens = [("x", x.len(), m * k), ("weight", weight.len(), k), ("b", b.len(), n * k), ("y", y.len(), m * k)];
    let side_lens = side.iter().zip(["residual", "h"]).map(|(s, what)| (what, s.1, m * k));
    for (what, len, want) in lens.into_iter().chain(side_lens) {
        assert!(len >= want, "norm_few_rows: {what} holds {len} elements, [{m}, {n}, {k}] needs {want}");
    }
    assert!(c.len() >= m * n, "norm_few_rows: c holds {} elements, [{m}, {n}] needs {}", c.len(), m * n);
    let (pr, ph) = side.first().zip(side.get(1)).map_or((0, 0), |(r, h)| (r.2, h.2));
    let mut ptrs = vec![x.ptr(), weight.ptr(), b.ptr(), y.ptr()];
    ptrs.extend(side.iter().map(|s| s.2));
    if !(takes_norm_few_rows(m, n, k) && aligned16(&ptrs)) {
        return Ok(false);
    }
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (FEW_ROWS_THREADS, 1, 1), shared_mem_bytes: 0 };
    let kernel = match (add.is_some(), m.next_power_of_two()) {
        (false, 1) => kernel!("rms_norm_few_rows_m1", T),
        (false, 2) => kernel!("rms_norm_few_rows_m2", T),
        (false, 4) => kernel!("rms_norm_few_rows_m4", T),
        (false, _) => kernel!("rms_norm_few_rows_m8", T),
        (true, 1) => kernel!("add_rms_norm_few_rows_m1", T),
        (true, 2) => kernel!("add_rms_norm_few_rows_m2", T),
        (true, 4) => kernel!("add_rms_norm_few_rows_m4", T),
        (true, _) => kernel!("add_rms_norm_few_rows_m8", T),
    };
    let (m, n, k) = (m as u32, n as u32, u32_arg("norm_few_rows: k", k));
    // SAFETY: {add_,}rms_norm_few_rows_m{1,2,4,8}_T(const T* x, const T* residual, const T* weight, T* h, T* y,
    // const T* b, T* c, unsigned m, unsigned n, unsigned k, float eps, float offset) reads x[r·k + i] and, for add_,
    // residual[r·k + i] (r < m ≤ 8, rows past m clamped to m − 1; i < k), weight[i] and b[j·k + i] (j < n, the
    // grid), writes y[r·k + i], for add_ h[r·k + i], and c[r·n + j] for r < m: inside the buffers (asserted above),
    // on this device; the residual and h are null only for the kernels that never touch them; k a multiple of 8 and
    // every buffer 16-byte aligned (checked above), so every 8-element vector access is aligned; k ≤ 8·512 and
    // blocks of 512 threads (gemm_few_rows' 16 warps; NormRows' one chunk per thread and row).
    unsafe {
        launch!(&dev, Module::Matmul, kernel, cfg;
            x.ptr(), pr, weight.ptr(), ph, y.ptr(), b.ptr(), c.ptr(), m, n, k, eps, offset)?;
    }
    Ok(true)
}

/// One cuBLASLt call: `batch` entries of `g`'s product, starting at these device addresses.
#[derive(Clone, Copy)]
struct Product {
    g: Gemm,
    batch: usize,
    a: u64,
    b: u64,
    c: u64,
    stride_c: usize,
}

/// A device's cuBLASLt handle, workspace and plans, made on its first GEMM and kept while the device is open (for the
/// process: devices are never closed, so the handle is never released; the plans' descriptors are, when this drops).
pub(crate) struct BlasLt {
    handle: sys::cublasLtHandle_t,
    workspace: Block,
    /// The plan of every product seen so far, so that a repeated one costs one `cublasLtMatmul` call and no
    /// descriptor or heuristic work. The lock also serialises the calls: cuBLASLt does not promise that one handle
    /// takes concurrent ones, and the workspace is shared; a call only enqueues work, so it is held for microseconds.
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle and the plans' descriptors are opaque pointers to host objects that cuBLASLt allows to be used
// from any thread; `plans` serialises every use of them, and the workspace is device memory used only in stream
// order.
unsafe impl Send for BlasLt {}
unsafe impl Sync for BlasLt {}

/// Plans kept at most; past it the cache starts over (a process sees a few dozen shapes per model, so only a run
/// whose shapes never repeat gets here, and it would gain nothing from keeping them).
const MAX_PLANS: usize = 1024;

/// Everything a plan depends on. cuBLASLt's descriptors and heuristic see the shapes, layouts, type and alignments,
/// never alpha or beta (arguments of the call alone; alpha == 0 does not even reach cuBLASLt), so those are not part
/// of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    ty: sys::cudaDataType_t,
    m: u64,
    n: u64,
    k: u64,
    batch: usize,
    trans_a: bool,
    trans_b: bool,
    /// Batch strides in elements, 0 when batch == 1 (unused then).
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    /// Leading dimensions in elements (row strides of the row-major operands).
    ld_a: usize,
    ld_b: usize,
    ld_c: usize,
    /// The alignment the heuristic is told for each operand ([`alignment`]): an algorithm chosen for a better
    /// aligned address could fault on this one.
    align_a: u32,
    align_b: u32,
    align_c: u32,
}

impl PlanKey {
    fn new<T: GpuFloat>(p: &Product) -> PlanKey {
        let g = &p.g;
        let batched = p.batch > 1;
        let stride = |s: usize| if batched { s } else { 0 };
        let bytes = size_of::<T>();
        let (ld_a, ld_b, ld_c) = g.lds();
        PlanKey {
            ty: T::blas_type(),
            m: g.m as u64,
            n: g.n as u64,
            k: g.k as u64,
            batch: p.batch,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            stride_a: stride(g.stride_a),
            stride_b: stride(g.stride_b),
            stride_c: stride(p.stride_c),
            ld_a,
            ld_b,
            ld_c,
            align_a: alignment(p.a, (stride(g.stride_a) | ld_a) * bytes),
            align_b: alignment(p.b, (stride(g.stride_b) | ld_b) * bytes),
            align_c: alignment(p.c, (stride(p.stride_c) | ld_c) * bytes),
        }
    }
}

/// The largest power of two up to 256 (cuBLASLt's default assumption) dividing an address and the byte steps taken from
/// it (batch stride and leading dimension, or-ed: their common power of two is the lowest bit set in either).
fn alignment(ptr: u64, stride_bytes: usize) -> u32 {
    1u32 << (ptr | stride_bytes as u64 | 256).trailing_zeros()
}

/// One product's descriptors and the algorithm the heuristic chose for them; None when it found none (remembered,
/// so that the entry-by-entry fallback of a batch it cannot take does not ask again).
struct Plan {
    desc: Desc,
    /// cuBLASLt's A (our B), its B (our A), and C = D.
    la: Layout,
    lb: Layout,
    lc: Layout,
    algo: Option<sys::cublasLtMatmulAlgo_t>,
}

impl Plan {
    /// Descriptors and heuristic for `key`; the device's context must be current.
    fn new(handle: sys::cublasLtHandle_t, workspace: usize, key: &PlanKey) -> Result<Plan> {
        let (m, n, k) = (key.m, key.n, key.k);
        // cuBLASLt's A is our B, [n, k] after its op; its B is our A, [k, m] after its op; its C and D are our C.
        let (b_rows, b_cols) = if key.trans_b { (k, n) } else { (n, k) };
        let (a_rows, a_cols) = if key.trans_a { (m, k) } else { (k, m) };
        let la = Layout::new(key.ty, (b_rows, b_cols, key.ld_b), key.batch, key.stride_b)?;
        let lb = Layout::new(key.ty, (a_rows, a_cols, key.ld_a), key.batch, key.stride_a)?;
        let lc = Layout::new(key.ty, (n, m, key.ld_c), key.batch, key.stride_c)?;
        let desc = Desc::new(key.trans_b, key.trans_a)?;
        let pref = Pref::new(workspace)?;
        use sys::cublasLtMatmulPreferenceAttributes_t as Attr;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &key.align_b)?;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &key.align_a)?;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &key.align_c)?;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &key.align_c)?;
        // Split-k parts are summed in f32 or not at all: the in-place and output-type schemes add bf16 partial sums
        // (8 × 1024 · 1024 × 129 in bf16 came out 0.125 off a value of 4: cuda_parity's matmul test).
        let reductions = sys::cublasLtReductionScheme_t::CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE as u32;
        pref.set(Attr::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reductions)?;
        // SAFETY: every descriptor is live (the layouts and desc are owned by the plan, pref until the end of this
        // function); the heuristic is told the true alignment of each pointer, batch stride and leading dimension, so the algorithm
        // it picks is valid for every product with this key.
        let algo = match unsafe { lt::get_matmul_algo_heuristic(handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) } {
            Ok(heuristic) => Some(heuristic.algo),
            Err(CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => None,
            Err(e) => return Err(Error::cublas("cublasLtMatmulAlgoGetHeuristic")(e)),
        };
        Ok(Plan { desc, la, lb, lc, algo })
    }
}

impl BlasLt {
    /// NVIDIA's recommended workspace: 32 MiB on Hopper, 4 MiB before it.
    fn workspace_bytes(dev: &CudaDevice) -> usize {
        if dev.compute_capability().0 >= 9 {
            32 << 20
        } else {
            4 << 20
        }
    }

    pub(crate) fn new(dev: &CudaDevice) -> Result<BlasLt> {
        // SAFETY: dlopen and dlclose by name; no function is called (cudarc panics on a missing library).
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoCublasLt);
        }
        dev.bind()?;
        let handle = lt::create_handle().map_err(Error::cublas("cublasLtCreate"))?;
        let workspace = dev.allocator().allocate(Self::workspace_bytes(dev))?;
        Ok(BlasLt { handle, workspace, plans: Mutex::new(HashMap::new()) })
    }

    fn run<T: GpuFloat>(&self, dev: &CudaDevice, p: &Product) -> Result<()> {
        let key = PlanKey::new::<T>(p);
        let (alpha, beta) = (p.g.alpha as f32, p.g.beta as f32);
        let mut plans = self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        dev.bind()?;
        if plans.len() >= MAX_PLANS && !plans.contains_key(&key) {
            plans.clear();
        }
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let plan = Plan::new(self.handle, self.workspace.size, &key)?;
                e.insert(plan)
            }
        };
        let Some(algo) = &plan.algo else {
            return Err(Error::cublas("cublasLtMatmulAlgoGetHeuristic")(CublasError(
                sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
            )));
        };
        // SAFETY: the plan's layouts describe exactly the batch entries that `matmul` asserted lie inside a, b and c
        // (device addresses on this device, whose context is bound), and its algorithm was chosen for their
        // alignment (part of the key); alpha and beta are host f32 (the scale type); C is D, which cuBLASLt allows
        // for an in-place update, and with beta == 0 it does not read C. The workspace is this handle's own, used in
        // stream order; the call is enqueued on the device's one stream.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                p.b as *const c_void,
                plan.la.0,
                p.a as *const c_void,
                plan.lb.0,
                p.c as *const c_void,
                plan.lc.0,
                p.c as *mut c_void,
                plan.lc.0,
                algo,
                self.workspace.ptr as *mut c_void,
                self.workspace.size,
                dev.cu_stream().cast(),
            )
        }
        .map_err(Error::cublas("cublasLtMatmul"))
    }

    fn plan_count(&self) -> usize {
        self.plans.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}

/// A cuBLASLt object, owned: made by its type's `new` alone and destroyed once, when the owner drops.
macro_rules! lt_object {
    ($(#[$doc:meta])* $name:ident($handle:ty), $destroy:path) => {
        $(#[$doc])*
        struct $name($handle);

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the handle is live (made by `new`) and destroyed once, here. A failure cannot be reported
                // from drop and leaks a few bytes of host memory at worst.
                let _ = unsafe { $destroy(self.0) };
            }
        }
    };
}

lt_object!(
    /// A column-major `rows × cols` matrix of `ty` with leading dimension `ld` (≥ rows: a row-major matrix's row
    /// stride), `batch` of them `stride` apart.
    Layout(sys::cublasLtMatrixLayout_t),
    lt::destroy_matrix_layout
);
lt_object!(
    /// f32 compute and scale, with cuBLASLt's A and B transposed as asked.
    Desc(sys::cublasLtMatmulDesc_t),
    lt::destroy_matmul_desc
);
lt_object!(
    /// The heuristic's constraints: the workspace it may use and how aligned each operand really is.
    Pref(sys::cublasLtMatmulPreference_t),
    lt::destroy_matmul_pref
);

impl Layout {
    fn new(ty: sys::cudaDataType, (rows, cols, ld): (u64, u64, usize), batch: usize, stride: usize) -> Result<Layout> {
        let layout = Layout(
            lt::create_matrix_layout(ty, rows, cols, ld as i64).map_err(Error::cublas("cublasLtMatrixLayoutCreate"))?,
        );
        if batch > 1 {
            let (count, stride) = (i32::try_from(batch).expect("matmul: batch fits i32"), stride as i64);
            // SAFETY: the layout is live; each attribute gets a value of the type cuBLASLt documents for it (int32
            // count, int64 offset), passed by pointer with its size.
            unsafe {
                lt::set_matrix_layout_attribute(
                    layout.0,
                    sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    (&count as *const i32).cast(),
                    size_of::<i32>(),
                )
                .and_then(|()| {
                    lt::set_matrix_layout_attribute(
                        layout.0,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        (&stride as *const i64).cast(),
                        size_of::<i64>(),
                    )
                })
            }
            .map_err(Error::cublas("cublasLtMatrixLayoutSetAttribute"))?;
        }
        Ok(layout)
    }
}

impl Desc {
    fn new(trans_a: bool, trans_b: bool) -> Result<Desc> {
        let desc = Desc(
            lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F)
                .map_err(Error::cublas("cublasLtMatmulDescCreate"))?,
        );
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, trans_a),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, trans_b),
        ] {
            // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (an int32 attribute).
            let op = t as i32;
            // SAFETY: the descriptor is live; the attribute takes an int32 by pointer.
            unsafe { lt::set_matmul_desc_attribute(desc.0, attr, (&op as *const i32).cast(), size_of::<i32>()) }
                .map_err(Error::cublas("cublasLtMatmulDescSetAttribute"))?;
        }
        Ok(desc)
    }
}

impl Pref {
    fn new(workspace: usize) -> Result<Pref> {
        let pref = Pref(lt::create_matmul_pref().map_err(Error::cublas("cublasLtMatmulPreferenceCreate"))?);
        let bytes = workspace as u64;
        pref.set(sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes)?;
        Ok(pref)
    }

    fn set<V>(&self, attr: sys::cublasLtMatmulPreferenceAttributes_t, value: &V) -> Result<()> {
        // SAFETY: the preference is live; callers pass the type cuBLASLt documents for the attribute (uint64
        // workspace bytes, uint32 alignments), by pointer with its size.
        unsafe { lt::set_matmul_pref_attribute(self.0, attr, (value as *const V).cast(), size_of::<V>()) }
            .map_err(Error::cublas("cublasLtMatmulPreferenceSetAttribute"))
    }
}
