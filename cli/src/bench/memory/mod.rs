//! What a training step will hold, estimated from the shapes before anything is built, so that a model that cannot
//! fit is reported (`llama-3.1-70b` on a smaller GPU) instead of failing half-way through its upload. The estimate
//! follows what the step keeps: base weights as stored, adapters with their gradients and AdamW moments, the saved
//! activations of every layer (or only the layer inputs under checkpointing), then the larger of the loss's chunk
//! (the fused head and loss form [rows, vocab] logits a chunk at a time) and a layer's backward, and the dequantized
//! scratch of the largest weight. It ignores the allocator's rounding and short-lived temporaries: read it as ±15 %.
//! (At 4 × 2048 tokens it gives 2.56, 9.75 and 4.46 GiB for Llama-3.2-1B, Llama-3-8B and Gemma-2-2B; the H200 measured
//! allocator peaks of 2.53, 9.57 and 4.55 GiB, run F in `benches/RESULTS.md`.)

use qlora_kernels::nf4::{nf4_num_blocks, nf4_packed_len, NESTED_BLOCKSIZE};
use qlora_models::transformer::BaseFormat;
use qlora_models::ModelConfig;
use qlora_optim::AdamW;
use qlora_runtime::dist::Communicator;
use qlora_runtime::memory::MemoryStats;
use qlora_runtime::ops::linear_cross_entropy::chunk_rows;
use qlora_runtime::{DType, Device};

/// Each decoder layer's projections as (name, [out, in]), in the model's order.
pub fn projection_shapes(c: &ModelConfig) -> [(&'static str, [usize; 2]); 7] {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (qo, kvo) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    [
        ("q_proj", [qo, h]),
        ("k_proj", [kvo, h]),
        ("v_proj", [kvo, h]),
        ("o_proj", [h, qo]),
        ("gate_proj", [i, h]),
        ("up_proj", [i, h]),
        ("down_proj", [h, i]),
    ]
}

/// Parameters of every linear layer, the head included: the N of the 6N (4N without checkpointing) FLOPs per
/// token of a QLoRA step (ARCHITECTURE.md).
pub fn linear_params(c: &ModelConfig) -> usize {
    let per_layer: usize = projection_shapes(c).iter().map(|(_, [o, i])| o * i).sum();
    per_layer * c.num_hidden_layers + c.vocab_size * c.hidden_size
}

/// What the estimate needs to know about the run.
pub struct Setup<'a> {
    pub config: &'a ModelConfig,
    pub format: BaseFormat,
    /// Where the step runs and the dtype activations and dense weights are held in there.
    pub device: Device,
    pub compute: DType,
    /// Tokens of one micro-batch.
    pub tokens: usize,
    pub r: usize,
    pub dora: bool,
    pub targets: &'a [&'a str],
    pub checkpointing: bool,
    /// The ranks an NF4 base is sharded across (`--shard-base`); 1 when each holds it whole.
    pub shards: usize,
    /// Data parallelism: the group's ranks and the micro-batches each trains a step (the busiest's); (1, 1) alone.
    pub ranks: (usize, usize),
    /// What a memory budget chose ([`plan`]); [`Plan::default`] without one.
    pub plan: Plan,
}

/// How a step holds its activations under checkpointing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The last layers that keep their activations instead of being recomputed.
    pub keep_layers: usize,
    /// How many recomputed layers, the first ones, have their inputs wait in pinned host memory (a GPU only, at
    /// most the recomputed layers; see `CausalLm::offload_layers`); the other recomputed layers keep theirs on the
    /// device.
    pub offload: usize,
    /// How many of the layers checkpointing would recompute keep their activations in pinned host memory instead
    /// (a GPU only, at most the recomputed layers; see `CausalLm::park_layers`): no recompute, their activations
    /// copied out and back under the other layers' compute.
    pub park: usize,
    /// AdamW's moments wait in pinned host memory between updates (a GPU only; see `AdamW::set_paged`).
    pub page_optimizer: bool,
    /// The frozen embedding table stays in host memory, rows uploaded per batch (an untied head only; see
    /// `CausalLm::keep_embeddings_on_host`).
    pub host_embeddings: bool,
    /// Each layer's MLP runs this many tokens at a time (`CausalLm::mlp_chunk_tokens`).
    pub mlp_block: Option<usize>,
}

/// Tokens per MLP block when a plan runs the MLP in blocks: small enough that a block's intermediate (3 × its width
/// per token) is a fraction of a long sequence's, large enough that each block's GEMMs still fill the GPU.
pub const MLP_BLOCK: usize = 4096;

impl Plan {
    pub fn apply(self, model: &mut qlora_models::transformer::CausalLm, optimizer: &mut AdamW) -> anyhow::Result<()> {
        model.keep_layers = self.keep_layers;
        model.offload_layers = self.offload;
        model.park_layers = self.park;
        model.mlp_chunk_tokens = self.mlp_block;
        if self.host_embeddings {
            model.keep_embeddings_on_host()?;
        }
        optimizer.set_paged(self.page_optimizer)?;
        Ok(())
    }

    /// Every plan in the order [`plan`] tries them, fastest first: keeping activations, then recomputing, then (a
    /// GPU only) offloading layer inputs, then paging the optimizer and (with an untied head) keeping the embeddings
    /// on the host too, then running the MLP in blocks. In each mode the plans go from the fewest layers recomputed
    /// up; a layer is not recomputed when it keeps its activations on the device or, up to `park` layers (what the
    /// host link carries under the forward: [`park_capacity`]), parks them in host memory, which runs nearly as fast
    /// (the copies hide under compute) and costs the device about one layer's activations whatever the count. Among
    /// plans that recompute as many layers, more kept on the device comes first; where the mode offloads, each takes
    /// the offloaded counts from the fewest up (none only where the mode pages, as the mode before already tried it
    /// without paging), so the first plan that fits recomputes as few layers as it can, then offloads as few inputs.
    fn all(layers: usize, gpu: bool, untied: bool, park: usize) -> impl Iterator<Item = Plan> {
        const BLOCK: Option<usize> = Some(MLP_BLOCK);
        let modes: Vec<(bool, bool, Option<usize>)> = match (gpu, layers > 0) {
            (true, true) => vec![(false, false, None), (true, false, None), (true, true, None), (true, true, BLOCK)],
            (false, true) => vec![(false, false, None), (false, false, BLOCK)],
            (_, false) => vec![(false, false, None)],
        };
        let park = if gpu { park } else { 0 };
        modes.into_iter().flat_map(move |(offloading, paged, mlp_block)| {
            let (page_optimizer, host_embeddings) = (paged, paged && untied);
            let mut plans: Vec<Plan> = (0..=layers)
                .rev()
                .flat_map(|keep_layers| {
                    let recomputed = layers - keep_layers;
                    let mut parks = vec![park.min(recomputed)];
                    if parks[0] > 0 {
                        parks.push(0);
                    }
                    parks.into_iter().flat_map(move |park| {
                        let checkpointed = recomputed - park;
                        let counts = match (offloading, paged) {
                            (false, _) => 0..=0,
                            (true, false) => 1..=checkpointed,
                            (true, true) => 0..=checkpointed,
                        };
                        counts.map(move |offload| Plan {
                            keep_layers,
                            offload,
                            park,
                            page_optimizer,
                            host_embeddings,
                            mlp_block,
                        })
                    })
                })
                .collect();
            plans.sort_by_key(|p| layers - p.keep_layers - p.park);
            plans
        })
    }
}

/// Bytes, by what holds them.
#[derive(Clone, Copy, Debug)]
pub struct Estimate {
    pub weights: usize,
    /// Adapter values, gradients and optimizer moments.
    pub adapters: usize,
    pub activations: usize,
    /// Pinned host memory for offloaded layer inputs and paged optimizer moments (not part of [`Estimate::total`],
    /// which is the device's).
    pub host: usize,
}

impl Estimate {
    pub fn total(&self) -> usize {
        self.weights + self.adapters + self.activations
    }
}

pub fn estimate(s: &Setup) -> Estimate {
    let c = s.config;
    let d = s.compute.size_in_bytes();
    let (t, h, layers) = (s.tokens, c.hidden_size, c.num_hidden_layers);
    let shapes = projection_shapes(c);
    let stored = |n: usize| match s.format {
        BaseFormat::Nf4 { blocksize, double_quant } => {
            let nb = nf4_num_blocks(n, blocksize);
            let scales = if double_quant { nb + 4 * nb.div_ceil(NESTED_BLOCKSIZE) + 4 } else { 4 * nb };
            nf4_packed_len(n) + scales
        }
        BaseFormat::Dense(dtype) => n * dtype.size_in_bytes(),
    };
    let heads = if c.tie_word_embeddings { 1 } else { 2 };
    let host_table = s.plan.host_embeddings && heads == 2 && s.device != Device::Cpu;
    let on_device = if host_table { 1 } else { heads };
    let per_layer = shapes.iter().map(|(_, [o, i])| stored(o * i)).sum::<usize>();
    // On the CPU a parked layer is simply kept (host memory is where it computes).
    let cpu_parked = if s.device == Device::Cpu { s.plan.park } else { 0 };
    let recomputed =
        if s.checkpointing { layers.saturating_sub(s.plan.keep_layers).saturating_sub(cpu_parked) } else { 0 };
    let decoder = match s.format {
        // A rank's share, plus the layers gathered whole: one running (in forward, or recomputed in backward), its
        // gathered streams while they are cut into weights, the next layer's streams on their way, and every layer
        // not recomputed, whose weights its forward keeps for backward.
        BaseFormat::Nf4 { .. } if s.shards > 1 => {
            (layers * per_layer).div_ceil(s.shards) + ((layers - recomputed) + 3).min(layers + 1) * per_layer
        }
        _ => layers * per_layer,
    };
    let weights = decoder + on_device * c.vocab_size * h * d + layers * 6 * h * d;

    // Value and gradient in f32; AdamW's two moments in f32 on a GPU (unless paged to the host), f64 on the host.
    let paged = s.plan.page_optimizer && s.device != Device::Cpu;
    let per_param = match s.device {
        Device::Cpu => 4 + 4 + 16,
        _ if paged => 4 + 4,
        _ => 4 + 4 + 8,
    };
    let adapter_params: usize = shapes
        .iter()
        .filter(|(name, _)| s.targets.contains(name))
        .map(|(_, [o, i])| s.r * (o + i) + if s.dora { *o } else { 0 })
        .sum();
    // A data-parallel rank keeps each micro-batch's gradients (one f32 per adapter parameter) until the step's end,
    // through the next micro-batches' peaks, then gathers and replays them slot by slot: one slot of every rank and
    // its own still to send (cli/src/finetune/parallel.rs `optimizer_step`), when the activations are gone.
    let (ranks, slots) = s.ranks;
    let grads = layers * adapter_params * 4;
    let (held, exchange) = if ranks > 1 { ((slots - 1) * grads, (ranks + slots) * grads) } else { (0, 0) };
    let adapters = layers * adapter_params * per_param + held;
    let paged_moments = if paged { layers * adapter_params * 8 } else { 0 };

    let (i, qo) = (c.intermediate_size, shapes[0].1[0]);
    let LayerSaved { attention_side, product, layer, kept } = layer_saved(s);
    // In blocks, a recomputed layer's MLP part holds one block's intermediate at a time.
    let blocked_mlp = s.plan.mlp_block.map_or(0, |b| t.saturating_sub(b) * d * 3 * i);
    // Offloaded, a recomputed layer's input is on the device only from its copy back (one layer ahead) to the end of
    // its backward: two at a time. Those two arrive in the backward of the first layers, the offloaded ones, when the
    // later layers' inputs kept on the device have been freed by their own backward (it ran before): at most the
    // larger of the two counts is on the device at once.
    let offloaded = offloaded_layers(s);
    let parked = parked_layers(s);
    // A parked layer's input stays on the device as a checkpoint's does, and at the step's peak (a recomputed layer's
    // backward) about one parked layer's activations are there too: the one arriving for the next backward, or the
    // last one parked, which stays for its backward, the first. Measured (RESULTS run P): +0.73 GiB for an 8B layer
    // of 0.84, +0.40 for a 1B layer of 0.45; +0.60 for an 8B layer of 0.72 (the norms' outputs no longer kept).
    let inputs = (recomputed - parked - offloaded).max(offloaded.min(2)) + parked;
    let host =
        offloaded * t * h * d + parked * kept + paged_moments + if host_table { c.vocab_size * h * d } else { 0 };
    let saved = inputs * t * h * d + (layers - recomputed + parked.min(1)) * kept;
    // The peak comes either at the loss (one chunk's logits, their softcapped copy, their gradient and the capped
    // gradient, plus dx's parts and their concatenation) or in a layer's backward (its recomputed activations and
    // their gradients, about half as large again: fitted to the measured peaks above), on top of what stays saved.
    let softcap = usize::from(c.final_logit_softcapping.is_some());
    let chunk = chunk_rows(c.vocab_size).min(t);
    let head = (3 + softcap) * chunk * c.vocab_size * d + 2 * t * h * d;
    // While a layer's backward runs it holds the product again (formed there, over dx's buffer). With the MLP in
    // blocks the attention's backward can hold more: its saved tensors, their gradients, and the flash kernel's f32
    // dq accumulator (a 400,000-token Llama-3-8B step peaked 3.6 GiB over the MLP rule alone on an H100, run O).
    let attention_backward = attention_side * 3 / 2 + t * qo * 4;
    let in_layer = if recomputed > parked {
        ((layer + product - blocked_mlp) * 3 / 2).max(attention_backward)
    } else {
        layer + product
    };
    let largest = shapes.iter().map(|(_, [o, i])| o * i).max().unwrap_or(0);
    // The step's end holds the exchange where the activations were (beyond the gradients `held` counts already).
    let activations = (saved + head.max(in_layer) + 2 * largest * d).max(exchange - held);
    Estimate { weights, adapters, activations, host }
}

/// What one layer's ops keep for backward, in bytes.
struct LayerSaved {
    /// The attention's half: norm input and output, q, k, v, the attention output and its log-sum-exp.
    attention_side: usize,
    /// The GLU's product, which backward forms again (0 under DoRA, which keeps it).
    product: usize,
    /// All of it, as a layer's backward holds it.
    layer: usize,
    /// What waits from forward to backward: `layer` less the norms' outputs, which backward forms again.
    kept: usize,
}

fn layer_saved(s: &Setup) -> LayerSaved {
    let c = s.config;
    let (d, t, h, i) = (s.compute.size_in_bytes(), s.tokens, c.hidden_size, c.intermediate_size);
    let shapes = projection_shapes(c);
    let (qo, kvo) = (shapes[0].1[0], shapes[1].1[0]);
    // What one layer's ops save for backward, tensor by tensor (the device's bytes: a tensor two ops save counts
    // once): the layer input and the attention norm's output, the roped q, k and v, the attention output (which
    // o_proj saves too) and its f32 log-sum-exp, the residual sum and the MLP norm's output, the MLP's gate and up.
    // Their product is formed again in backward (`Tape::glu_lora_linear`), except under DoRA, which keeps it. Rope
    // saves nothing of its input; Gemma 3's q/k norms save q and k before them, and Gemma's sandwich norms two more
    // of the hidden size. Between forward and backward the norms' outputs are not kept: the LoRA groups that read
    // them form them again in backward (`Tape::lora_linear_group_of`), except the MLP norm's when the MLP runs in
    // blocks (each block's checkpoint keeps its rows); a layer's backward holds them again.
    let family = c.family;
    let sandwich = if family == qlora_models::config::Family::Llama { 0 } else { 2 * h };
    let qk = if family == qlora_models::config::Family::Gemma3 { 3 } else { 2 };
    let product = if s.dora { 0 } else { t * d * i };
    let attention_side = t * d * (4 * h + sandwich + qk * (qo + kvo)) + t * c.num_attention_heads * 4;
    let layer = attention_side + t * d * 3 * i - product;
    let formed_again = if s.plan.mlp_block.is_some_and(|b| t > b) { 1 } else { 2 };
    LayerSaved { attention_side, product, layer, kept: layer - formed_again * t * h * d }
}

/// FLOPs a GPU runs in the time its host link moves one byte, for [`park_capacity`]: an H100's Llama-3-8B layers ran
/// their forward at ~520 TFLOP/s of linear-layer FLOPs with the link at 55 GB/s each way (RESULTS run P). An A100
/// (~250 TFLOP/s, PCIe 4 at ~25 GB/s) lands near it; a GPU whose link is slower for its compute parks a layer or two
/// too many and waits on their copies.
const FLOPS_PER_LINK_BYTE: f64 = 9400.0;

/// The share of the link's time under the forward that parked layers' copies out may fill: on the H100, 11 parked
/// 8B layers of 32 cost the forward 3 % and 16 cost 23 %, 4 of the 1B's 16 cost 3 % and 8 cost 54 %.
const LINK_SHARE: f64 = 0.85;

/// How many layers can park their activations with the copies out hidden under the forward (0 on the CPU and
/// without checkpointing): the bytes the link moves while the layers' linear FLOPs run, over one layer's activations.
/// Attention's FLOPs are left out, which only errs low (long sequences run longer forwards).
pub fn park_capacity(s: &Setup) -> usize {
    if !s.checkpointing || s.device == Device::Cpu {
        return 0;
    }
    let layers = s.config.num_hidden_layers;
    let per_layer: usize = projection_shapes(s.config).iter().map(|(_, [o, i])| o * i).sum();
    let link_bytes = 2.0 * s.tokens as f64 * per_layer as f64 / FLOPS_PER_LINK_BYTE;
    let parked = LINK_SHARE * layers as f64 * link_bytes / layer_saved(s).kept.max(1) as f64;
    (parked as usize).min(layers)
}

/// How many recomputed layers have their inputs offloaded under `s.plan`: none on the CPU (host memory is where it
/// computes) or without checkpointing, at most every recomputed layer that is not parked.
pub fn offloaded_layers(s: &Setup) -> usize {
    s.plan.offload.min(recomputed_on_gpu(s) - parked_layers(s))
}

/// How many recomputed layers keep their activations in pinned host memory under `s.plan`: none on the CPU or
/// without checkpointing, at most every recomputed layer.
pub fn parked_layers(s: &Setup) -> usize {
    s.plan.park.min(recomputed_on_gpu(s))
}

/// The layers `s.plan` would recompute where their inputs or activations can leave the device: on a GPU, under
/// checkpointing (0 otherwise).
fn recomputed_on_gpu(s: &Setup) -> usize {
    let movable = s.checkpointing && s.device != Device::Cpu;
    if movable {
        s.config.num_hidden_layers.saturating_sub(s.plan.keep_layers)
    } else {
        0
    }
}

/// `--memory-budget`: a size in GiB; `auto`: what the device has free, less [`AUTO_MARGIN`]; `lean`: the plan that
/// holds the least (every layer recomputed, their inputs offloaded to host memory on a GPU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    Gib(f64),
    Auto,
    Lean,
}

impl std::str::FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => return Ok(Budget::Auto),
            "lean" => return Ok(Budget::Lean),
            _ => {}
        }
        match s.parse::<f64>() {
            Ok(g) if g.is_finite() && g > 0.0 => Ok(Budget::Gib(g)),
            _ => Err(format!("expected a positive number of GiB, auto or lean, got {s:?}")),
        }
    }
}

/// The share of free memory `auto` leaves alone (at least 1 GiB): what the estimate does not count (the CUDA
/// context, cuBLASLt workspaces, the allocator's rounding, short-lived temporaries) and other processes' growth.
pub const AUTO_MARGIN: f64 = 0.10;

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Gib(g) => write!(f, "{g}"),
            Budget::Auto => write!(f, "auto"),
            Budget::Lean => write!(f, "lean"),
        }
    }
}

/// `e` with, when the GPU ran out of memory, the budget and plan the run had and what to change.
pub fn out_of_memory_advice(
    e: anyhow::Error,
    budget: Option<Budget>,
    plan: Option<&str>,
    shrink: &str,
) -> anyhow::Error {
    let oom = e.chain().any(|c| {
        c.downcast_ref::<qlora_runtime::Error>().is_some_and(qlora_runtime::Error::is_out_of_memory)
            || c.downcast_ref::<qlora_models::Error>()
                .is_some_and(|m| matches!(m, qlora_models::Error::Runtime(r) if r.is_out_of_memory()))
    });
    if !oom {
        return e;
    }
    let had = match (budget, plan) {
        (Some(b), Some(p)) => format!("with --memory-budget {b} ({p})"),
        _ => "without a memory budget".to_string(),
    };
    e.context(format!(
        "{had}: try --memory-budget lean (layer inputs offloaded, optimizer paged, MLP in blocks) or a smaller budget, \
         or {shrink}"
    ))
}

impl Budget {
    /// The budget in bytes on a device with `free` bytes free; None for `auto` where free memory is unknown, and for
    /// `lean`, which is a plan rather than a size.
    pub fn bytes(self, free: Option<usize>) -> Option<usize> {
        match self {
            Budget::Gib(g) => Some((g * GIB) as usize),
            Budget::Auto => free.map(|free| free - ((free as f64 * AUTO_MARGIN) as usize).max(1 << 30).min(free)),
            Budget::Lean => None,
        }
    }
}

/// The free memory a plan is made within: the device's and the host's (None where unknown). The ranks of a group
/// plan within the least that any of them has ([`Free::agreed`]), so that all make the same plan: a sharded base
/// gathers a layer again in each recompute, so ranks that recomputed different layers would pair different gathers,
/// and a step that fits one rank's estimate and not another's would stop one rank alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Free {
    pub device: Option<usize>,
    pub host: Option<usize>,
}

impl Free {
    /// This process's: [`available`] on `device` and on the host.
    pub fn measure(device: Device) -> anyhow::Result<Free> {
        Ok(Free { device: available(device)?, host: available(Device::Cpu)? })
    }

    /// The least of every rank's [`Free::measure`] on `device`, the same on every rank of `group` (a collective:
    /// every rank calls it); this process's own without a group.
    pub fn agreed(device: Device, group: Option<&dyn Communicator>) -> anyhow::Result<Free> {
        Free::measure(device)?.least_of(group)
    }

    /// The least of every rank's `self` (each field where known), the same on every rank of `group` (a collective);
    /// `self` without a group.
    pub fn least_of(self, group: Option<&dyn Communicator>) -> anyhow::Result<Free> {
        let Some(group) = group else { return Ok(self) };
        let unknown = u64::MAX;
        let local: Vec<u8> =
            [self.device, self.host].iter().flat_map(|v| v.map_or(unknown, |b| b as u64).to_le_bytes()).collect();
        let all = group.all_gather_bytes(&local)?;
        let least = |field: usize| {
            let value = |rank: &[u8]| u64::from_le_bytes(rank[8 * field..8 * field + 8].try_into().expect("8 bytes"));
            all.chunks_exact(16).map(value).filter(|&v| v != unknown).min().map(|v| v as usize)
        };
        Ok(Free { device: least(0), host: least(1) })
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The plan a run takes under `budget` (none: [`default_plan`]) with `park` layers parked instead of the plan's
/// choice (`--park-layers`; None keeps it), and its estimate; an error naming the budget, the smallest plan and what
/// to change when nothing fits, when the plan needs more host memory than is available, or when parking is asked for
/// on the CPU.
pub fn budget_plan(
    s: &Setup,
    free: Free,
    budget: Option<Budget>,
    park: Option<usize>,
    shrink: &str,
) -> anyhow::Result<(Plan, Estimate)> {
    anyhow::ensure!(
        park.is_none() || s.device != Device::Cpu,
        "--park-layers: parking moves activations off a GPU; this run is on the CPU"
    );
    let chosen = match budget {
        None => default_plan(s, free)?,
        Some(Budget::Lean) => lean(s),
        Some(budget) => {
            let bytes = budget.bytes(free.device).ok_or_else(|| {
                anyhow::anyhow!("--memory-budget auto: free memory on {} is unknown; give a size in GiB", s.device)
            })?;
            // A plan that fits the device but no plan that fits the host too: the host check below names it.
            let within_host = plan_within(s, bytes, free.host).ok();
            let fastest = || {
                plan(s, bytes).map_err(|e| {
                    anyhow::anyhow!(
                    "--memory-budget {:.2} GiB: even the leanest plan (every layer recomputed{}) needs about {:.2} \
                     GiB (weights {:.2}, adapters and optimizer {:.2}, activations {:.2}); {shrink}, or raise the \
                     budget",
                    bytes as f64 / GIB,
                    if s.device == Device::Cpu { "" } else { ", its input offloaded to host memory" },
                    e.total() as f64 / GIB,
                    e.weights as f64 / GIB,
                    e.adapters as f64 / GIB,
                    e.activations as f64 / GIB,
                )
                })
            };
            match within_host {
                Some((p, _)) => p,
                None => fastest()?.0,
            }
        }
    };
    let chosen = Plan { park: park.unwrap_or(chosen.park), ..chosen };
    let chosen_setup = Setup { plan: chosen, ..*s };
    let e = estimate(&chosen_setup);
    if e.host > 0 {
        if let Some(free) = free.host.filter(|&free| e.host > free) {
            anyhow::bail!(
                "memory plan: {} needs {:.2} GiB of pinned host memory and {:.2} GiB is available; {shrink}, or \
                 raise --memory-budget so that fewer layers are offloaded",
                host_parts(chosen, offloaded_layers(&chosen_setup)).join(", "),
                e.host as f64 / GIB,
                free as f64 / GIB
            );
        }
    }
    Ok((chosen, e))
}

/// The plan without a budget: every layer checkpointed as `Setup` says, nothing kept or offloaded, and on a GPU as
/// many layers parked in host memory instead of recomputed as the host link carries ([`park_capacity`]) and half the
/// host's available memory holds (this process's part of it, where a launch put several on this node), where the
/// device has room for the one layer's activations that parking adds: a
/// faster step for that much more device memory (Llama-3-8B at 4 × 2048 tokens on an H100: 13 of 32 layers parked,
/// 9.4 GiB of pinned host memory, 0.92× the time for +0.60 GiB, RESULTS run P; at long sequences a layer's
/// activations outgrow the device and nothing parks).
pub fn default_plan(s: &Setup, free: Free) -> anyhow::Result<Plan> {
    let device = if park_capacity(s) > 0 { free.device } else { None };
    // The ranks of a group on this node share its memory: each takes its part of the half.
    let local = qlora_runtime::dist::launch::Launch::from_env()?.map_or(1, |l| l.local_world_size);
    Ok(default_plan_within(s, free.host.map(|free| free / local), device))
}

/// [`default_plan`] with `host` bytes available in host memory and `device` bytes on the device (None: unbounded).
fn default_plan_within(s: &Setup, host: Option<usize>, device: Option<usize>) -> Plan {
    let host = host.map(|free| free / 2);
    let mut park = park_capacity(s);
    while park > 0 {
        let e = estimate(&Setup { plan: Plan { park, ..Plan::default() }, ..*s });
        if host.is_none_or(|h| e.host <= h) && device.is_none_or(|d| e.total() <= d) {
            break;
        }
        park -= 1;
    }
    Plan { park, ..Plan::default() }
}

/// What `plan` keeps in pinned host memory, `offloaded` being its count of offloaded layer inputs (see
/// [`offloaded_layers`]), as phrases: "the inputs of 20 layers", "AdamW's moments", "the embedding table".
fn host_parts(plan: Plan, offloaded: usize) -> Vec<String> {
    let mut host = Vec::new();
    if plan.park > 0 {
        host.push("parked activations".to_string());
    }
    if offloaded > 0 {
        host.push(format!("the inputs of {offloaded} layer{}", if offloaded == 1 { "" } else { "s" }));
    }
    if plan.page_optimizer {
        host.push("AdamW's moments".to_string());
    }
    if plan.host_embeddings {
        host.push("the embedding table".to_string());
    }
    host
}

/// The plan in one line, printed at the start of a run: "memory plan: 0 of 32 layers keep their activations, 32
/// recomputed in backward, 20 of them with inputs offloaded, the MLP 4096 tokens at a time (the inputs of 20 layers,
/// AdamW's moments, the embedding table: 62.33 GiB of pinned host memory); about 77.53 GiB on the device".
pub fn describe_plan(plan: Plan, layers: usize, e: &Estimate) -> String {
    let recomputed = layers - plan.keep_layers.min(layers);
    // Plans offload and park only on a GPU (`Plan::all`, `lean`), so the plan's counts are what runs.
    let parked = plan.park.min(recomputed);
    let offloaded = plan.offload.min(recomputed - parked);
    let recomputed = recomputed - parked;
    let parks = if parked > 0 { format!(", {parked} parked in host memory") } else { String::new() };
    let offloads = if offloaded > 0 { format!(", {offloaded} of them with inputs offloaded") } else { String::new() };
    let blocks = plan.mlp_block.map_or(String::new(), |b| format!(", the MLP {b} tokens at a time"));
    let host = host_parts(plan, offloaded);
    let host = if host.is_empty() || e.host == 0 {
        String::new()
    } else {
        format!(" ({}: {:.2} GiB of pinned host memory)", host.join(", "), e.host as f64 / GIB)
    };
    format!(
        "memory plan: {} of {layers} layers keep their activations{parks}, {recomputed} recomputed in backward\
         {offloads}{blocks}{host}; about {:.2} GiB on the device",
        plan.keep_layers.min(layers) + parked,
        e.total() as f64 / GIB
    )
}

/// The plan that holds the least: every layer recomputed with its MLP in blocks, and on a GPU their inputs
/// offloaded, all of them, and the optimizer paged.
fn lean(s: &Setup) -> Plan {
    let gpu = s.device != Device::Cpu;
    let mlp_block = (s.checkpointing && s.tokens > MLP_BLOCK).then_some(MLP_BLOCK);
    let host_embeddings = gpu && !s.config.tie_word_embeddings;
    let offload = if gpu && s.checkpointing { s.config.num_hidden_layers } else { 0 };
    Plan { keep_layers: 0, offload, park: 0, page_optimizer: gpu, host_embeddings, mlp_block }
}

/// The fastest plan within `budget` bytes: under checkpointing, as many of the last layers as fit keep their
/// activations (each one kept saves its recompute in backward); when even recomputing every layer does not fit, the
/// inputs of the first recomputed layers are offloaded to host memory (a GPU only), again keeping as many layers as
/// then fit and offloading as few inputs as then fit (host memory is finite: a 400,000-token sequence of Llama-3-8B
/// has 3 GiB of input per layer); then AdamW's moments are paged too. Offloading and paging come last because their
/// copies, though overlapped with compute, share the step with it (to be measured against the alternatives on a
/// GPU). Returns the plan and its estimate, or the estimate of the leanest plan when even that does not fit.
pub fn plan(s: &Setup, budget: usize) -> Result<(Plan, Estimate), Estimate> {
    plan_within(s, budget, None)
}

/// [`plan`] among the plans whose pinned host memory also fits in `host` bytes (None: unbounded). At long sequences
/// the fastest plan by device memory can offload more than the host holds, where a slower one (the MLP in blocks,
/// fewer inputs offloaded) fits both.
pub fn plan_within(s: &Setup, budget: usize, host: Option<usize>) -> Result<(Plan, Estimate), Estimate> {
    let layers = if s.checkpointing { s.config.num_hidden_layers } else { 0 };
    Plan::all(layers, s.device != Device::Cpu, !s.config.tie_word_embeddings, park_capacity(s))
        .map(|plan| (plan, estimate(&Setup { plan, ..*s })))
        .find(|(_, e)| e.total() <= budget && host.is_none_or(|h| e.host <= h))
        .ok_or_else(|| estimate(&Setup { plan: lean(s), ..*s }))
}

/// The longest sequence (tokens per row, `batch` rows per micro-batch) whose step fits by the estimate: the plan
/// `budget` picks within its bytes (the leanest plan with `lean`), or the plain step without one, within the budget or
/// else the device's `free` memory, with what the plan offloads within the host's (unbounded where unknown or on the
/// CPU, where nothing is offloaded). Found by doubling and then bisection (the estimate grows with the tokens).
pub fn longest_seq(s: &Setup, batch: usize, budget: Option<Budget>, free: Free) -> anyhow::Result<usize> {
    let limit = match budget {
        Some(b @ (Budget::Gib(_) | Budget::Auto)) => b.bytes(free.device),
        None | Some(Budget::Lean) => free.device,
    };
    let host = free.host.filter(|_| s.device != Device::Cpu);
    let bytes = limit.ok_or_else(|| {
        anyhow::anyhow!("--longest: free memory on {} is unknown; give --memory-budget GiB", s.device)
    })?;
    let fits = |seq: usize| {
        let at = Setup { tokens: batch * seq, ..*s };
        let e = match budget {
            None => Ok(estimate(&at)),
            Some(Budget::Lean) => Ok(estimate(&Setup { plan: lean(&at), ..at })),
            Some(_) => plan_within(&at, bytes, host).map(|(_, e)| e),
        };
        e.is_ok_and(|e| e.total() <= bytes && host.is_none_or(|h| e.host <= h))
    };
    if !fits(2) {
        anyhow::bail!("--longest: not even 2 tokens per row fit in {:.2} GiB", bytes as f64 / GIB);
    }
    // A sequence's tokens index i32 positions: the search stops there.
    let (mut lo, mut hi) = (2usize, 4usize);
    while fits(hi) {
        lo = hi;
        hi *= 2;
        if hi > i32::MAX as usize / batch.max(1) {
            return Ok(lo);
        }
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// The device allocator's peak split by what held it at that moment, as "2.53 GiB at the peak: weights 0.98,
/// adapters + optimizer 0.17, …" (None on the CPU, whose memory has no such accounting).
pub fn describe_peak(device: Device) -> anyhow::Result<Option<String>> {
    let Device::Cuda(ordinal) = device else { return Ok(None) };
    let stats = qlora_runtime::cuda_device(ordinal)?.memory_stats();
    let parts: Vec<String> = MemoryStats::by(&stats.at_peak)
        .filter(|&(_, bytes)| bytes > 0)
        .map(|(category, bytes)| format!("{} {:.2}", category.name(), bytes as f64 / GIB))
        .collect();
    Ok(Some(format!("{:.2} GiB at the peak: {} GiB", stats.peak as f64 / GIB, parts.join(", "))))
}

/// The split of the allocator's peak by category, in GiB to the KiB, for JSON reports (None on the CPU).
pub fn peak_split_gib(device: Device) -> anyhow::Result<Option<serde_json::Value>> {
    let Device::Cuda(ordinal) = device else { return Ok(None) };
    let stats = qlora_runtime::cuda_device(ordinal)?.memory_stats();
    let split = MemoryStats::by(&stats.at_peak)
        .map(|(c, b)| (c.name().to_string(), ((b as f64 / GIB * 1e6).round() / 1e6).into()));
    Ok(Some(serde_json::Value::Object(split.collect())))
}

/// Bytes that `device` can still give: the driver's free memory on a GPU, the kernel's MemAvailable on the host
/// (None where that is unknown).
pub fn available(device: Device) -> anyhow::Result<Option<usize>> {
    match device {
        Device::Cuda(ordinal) => {
            let (free, _) = qlora_runtime::cuda_device(ordinal)?.mem_info()?;
            Ok(Some(free))
        }
        Device::Cpu => Ok(std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })),
    }
}

#[cfg(test)]
mod tests;
