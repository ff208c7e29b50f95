//! Data-parallel finetune: ranks of a [`Communicator`] group share each optimizer step's micro-batches and end it
//! with the same adapter, bit for bit the one a single process would have.
//!
//! The global batch is what the flags say (`--grad-accum` micro-batches per step); rank r trains micro-batches
//! r, r + N, r + 2N, … of it. The loss of micro-batch j is normalised by the trained tokens of the whole step, which
//! every rank counts itself (each holds the whole data plan), so each rank's losses and gradients are the single
//! process's.
//!
//! Why the ranks gather per-micro-batch gradients rather than all-reduce a sum of their own: a single process adds
//! micro-batch j's gradient into each parameter's buffer in the order j = 0, 1, 2, … (`Param::accumulate_grad`, one
//! add per micro-batch), and float addition is not associative, so the only way N ranks reach the same bits is to
//! make the same additions in the same order. Each rank keeps its micro-batches' gradients apart
//! (`Param::take_grad` after each backward), the ranks all-gather them with the losses, and every rank replays them
//! through `accumulate_grad` in micro-batch order, then sums the losses in that order too. Clipping and AdamW then
//! run on identical gradients, so every rank's adapter and optimizer state stay identical and rank 0 alone writes
//! them. The cost, the gradients of a whole step on every rank, is small for adapters; a GPU backend that trades
//! exactness for speed would all-reduce each rank's local sum instead.
//!
//! This is what the in-process group runs (`--ranks`, threads on the CPU); it asks the group only for
//! [`Communicator`]'s collectives, so another backend drops in.

use super::step::{micro_step, update, Phase, Phases, StepConfig, StepOutcome};
use crate::device::DeviceArg;
use anyhow::{anyhow, bail, ensure, Context, Result};
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_optim::{AdamW, GradNorm};
use qlora_runtime::cuda::read_scalars;
use qlora_runtime::dist::launch::Launch;
use qlora_runtime::dist::{local_group, Buffer, Communicator, LocalRank};
use qlora_runtime::ops::concat::cat_rows;
use qlora_runtime::{DType, Device, Tensor};
use std::sync::Arc;

/// Tokens of a whole step, over every rank.
pub(crate) struct Tokens {
    pub all: usize,
    pub trained: usize,
}

/// The flags that spread a run over ranks, `finetune`'s and `bench`'s.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct RankArgs {
    /// GPUs to run on, one process each: more than one launches N copies of this command (ranks of an NCCL group,
    /// as torchrun would) that share each step's micro-batches (finetune: the flags' global batch, one GPU's run to
    /// a GPU's run-to-run rounding, as the attention backward's atomics do not promise the same bits twice; bench:
    /// --grad-accum micro-batches per GPU, every GPU's tokens counted and each GPU's peak reported).
    #[arg(long, value_name = "N", default_value_t = 1)]
    gpus: usize,
    /// With several GPUs: each holds 1/N of the frozen NF4 base and gathers a layer from the others just before it
    /// runs, FSDP-style (the adapters and their optimizer state stay whole on every GPU), so a base N times larger
    /// than one GPU's share trains; each process loads the model a layer at a time and keeps only its share. The
    /// same results as unsharded.
    #[arg(long)]
    pub shard_base: bool,
    /// Run as N data-parallel ranks in this process (threads on the CPU), splitting each step's micro-batches: the
    /// same losses and adapter as one rank, bit for bit. Hidden: it exists to test data parallelism (slower than one
    /// rank on the same cores); a torchrun-launched process is one rank of its own.
    #[arg(long, value_name = "N", default_value_t = 1, hide = true)]
    ranks: usize,
}

impl RankArgs {
    /// How this process runs on `device` (`--device`) under torchrun's environment if any; a usage mistake (such as
    /// --shard-base for a run of one, or of a dense base) is an error in one line.
    pub(crate) fn world(&self, device: DeviceArg, base: BaseFormat, doing: &str) -> Result<World> {
        ensure!(
            !self.shard_base || matches!(base, BaseFormat::Nf4 { .. }),
            "--shard-base shards an NF4 base (QLoRA); with --quantize none every rank holds the dense base whole"
        );
        let launch = Launch::from_env()?;
        let world = world(self.gpus, self.ranks, device, launch.as_ref())?;
        if self.shard_base && matches!(world, World::Alone(_)) {
            bail!("--shard-base splits the base across GPUs: {doing} on several (--gpus N, or a torchrun launch)");
        }
        Ok(world)
    }
}

/// How this process trains, from `--gpus`, `--ranks` and torchrun's environment.
#[derive(Debug, PartialEq)]
pub(crate) enum World {
    /// One process, one rank: the usual run.
    Alone(DeviceArg),
    /// `--ranks N`: N ranks as threads of this process, on the CPU.
    InProcess(usize),
    /// `--gpus N`: this process launches N copies of itself, one per GPU ([`super::spawn`]), and waits for them.
    Spawn(usize),
    /// One rank of a launched group (torchrun's, or `--gpus N`'s), on GPU `LOCAL_RANK`, through NCCL. torchrun's
    /// group of one (`WORLD_SIZE=1` with a `MASTER_ADDR`) is one too, as it is for PyTorch: it runs the multi-GPU
    /// path on a single GPU.
    Nccl(Launch),
}

fn world(gpus: usize, ranks: usize, device: DeviceArg, launch: Option<&Launch>) -> Result<World> {
    ensure!(gpus >= 1, "--gpus must be at least 1");
    ensure!(ranks >= 1, "--ranks must be at least 1");
    let gpu_only = |what: String| {
        anyhow!(
            "{what}: training across processes runs on GPUs through NCCL; --device cpu cannot (--ranks N runs N \
             ranks in one process on the CPU)"
        )
    };
    let group_of_one = |l: &&Launch| l.world_size == 1 && l.master.is_some() && device != DeviceArg::Cpu;
    if let Some(l) = launch.filter(|l| l.world_size > 1 || group_of_one(l)) {
        let (n, r) = (l.world_size, l.rank);
        ensure!(ranks == 1, "WORLD_SIZE={n} (rank {r}): --ranks does not combine with a launched group");
        ensure!(gpus == 1 || gpus == n, "WORLD_SIZE={n} (rank {r}) but --gpus {gpus}: launch one process per GPU");
        if device == DeviceArg::Cpu {
            return Err(gpu_only(format!("WORLD_SIZE={n} (rank {r})")));
        }
        return Ok(World::Nccl(l.clone()));
    }
    if gpus > 1 {
        ensure!(ranks == 1, "--gpus {gpus}: --ranks does not combine with several GPUs");
        if device == DeviceArg::Cpu {
            return Err(gpu_only(format!("--gpus {gpus}")));
        }
        return Ok(World::Spawn(gpus));
    }
    Ok(match (ranks, device) {
        (1, device) => World::Alone(device),
        (_, DeviceArg::Cuda) => bail!("--ranks runs in-process ranks on the CPU only; use --device cpu"),
        (n, _) => World::InProcess(n),
    })
}

/// Where this process computes in `world` (not [`World::Spawn`], whose launcher computes nothing), for `doing`.
pub(crate) fn placement(world: &World, dtype: DType, doing: &str) -> Result<(Device, DType)> {
    match world {
        World::Alone(device) => crate::device::pick(*device, dtype, doing),
        World::InProcess(_) => crate::device::pick(DeviceArg::Cpu, dtype, doing),
        World::Nccl(l) => crate::device::pick_gpu(l.local_rank, DeviceArg::Cuda, dtype, doing)
            .with_context(|| format!("WORLD_SIZE={} (rank {}) trains on cuda:{}", l.world_size, l.rank, l.local_rank)),
        World::Spawn(_) => unreachable!("the launcher of --gpus N computes nothing"),
    }
}

/// Runs `f` as this process's part of `world`: alone (no group), as its in-process ranks (rank 0's result), or as
/// its rank of the NCCL group (not [`World::Spawn`], whose launcher runs nothing itself).
pub(crate) fn run_as<T: Send>(
    world: &World,
    f: impl Fn(Option<Arc<dyn Communicator>>) -> Result<T> + Sync,
) -> Result<T> {
    match world {
        World::Alone(_) => f(None),
        World::InProcess(n) => in_process(*n, |group| f(Some(group))),
        World::Nccl(launch) => {
            let device = qlora_runtime::cuda_device(launch.local_rank)?;
            let group = Arc::new(qlora_runtime::dist::nccl::NcclRank::connect(launch, &device)?);
            let result = f(Some(group.clone()));
            if result.is_err() {
                // A failed rank leaves at once: the communicator's destroy would wait for collectives that the
                // others never join.
                group.abort();
            }
            result
        }
        World::Spawn(_) => unreachable!("the launcher of --gpus N runs nothing itself"),
    }
}

/// Runs `train` on `n` in-process ranks, one thread each; rank 0's result, or the error that stopped the group
/// (a rank's own failure rather than the others' "rank r left the group" that follows it).
fn in_process<T: Send>(n: usize, train: impl Fn(Arc<dyn Communicator>) -> Result<T> + Sync) -> Result<T> {
    let ranks = local_group(n)?;
    let results: Vec<Result<T>> = std::thread::scope(|s| {
        let train = &train;
        let threads: Vec<_> = ranks
            .into_iter()
            .map(|rank: LocalRank| {
                // The main thread's stack on Linux: loading and training were written for it.
                std::thread::Builder::new()
                    .name(format!("rank {}", rank.rank()))
                    .stack_size(8 << 20)
                    .spawn_scoped(s, move || train(Arc::new(rank)))
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| anyhow!("starting the rank threads: {e}"))?;
        Ok::<_, anyhow::Error>(
            threads
                .into_iter()
                .enumerate()
                .map(|(r, t)| t.join().unwrap_or_else(|_| Err(anyhow!("rank {r} panicked"))))
                .collect(),
        )
    })?;
    let departed = |e: &anyhow::Error| matches!(e.downcast_ref(), Some(qlora_runtime::Error::RankLeft { .. }));
    if let Some(e) = results.iter().position(|r| r.as_ref().is_err_and(|e| !departed(e))) {
        return results.into_iter().nth(e).expect("the position was found");
    }
    results.into_iter().next().expect("a group has a rank 0")
}

/// Whether every rank stops after this step: where any rank `wanted` to (an interrupt reaches each process of a
/// group, or only one: `kill -INT` of a rank, a scheduler's SIGTERM), so that all stop together.
pub(crate) fn agree_to_stop(group: &dyn Communicator, wanted: bool) -> Result<bool> {
    let mut flag = [f64::from(u8::from(wanted))];
    group.all_reduce_sum(Buffer::F64(&mut flag))?;
    Ok(flag[0] > 0.0)
}

/// One gathered micro-batch: its loss, then per trainable parameter a presence flag (a backward that did not reach
/// a parameter gives it no gradient, as in a single process), then every parameter's gradient (zeros if absent).
struct Layout {
    /// Elements per parameter, in `CausalLm::trainable_params` order (the same on every rank).
    sizes: Vec<usize>,
}

impl Layout {
    fn len(&self) -> usize {
        1 + self.sizes.len() + self.sizes.iter().sum::<usize>()
    }

    /// Micro-batch `j`'s record as this rank writes it, f32 [len] on `device`: the loss, the flags and the
    /// gradients taken from `params`. Built on the device (copies, no arithmetic): nothing is read back.
    fn record(&self, loss: &Tensor, params: &[qlora_autograd::Param], device: Device) -> Result<Tensor> {
        ensure!(loss.dtype() == DType::F32, "data-parallel training needs an f32 loss, got {:?}", loss.dtype());
        let mut flags = vec![0.0f32; params.len()];
        let mut parts = Vec::with_capacity(2 + params.len());
        parts.push(loss.reshape(&[1])?);
        for (i, (p, &n)) in params.iter().zip(&self.sizes).enumerate() {
            match p.take_grad() {
                Some(g) => {
                    ensure!(
                        g.dtype() == DType::F32,
                        "data-parallel training needs f32 gradients, {} has {:?}",
                        p.name(),
                        g.dtype()
                    );
                    flags[i] = 1.0;
                    parts.push(g.reshape(&[n])?);
                }
                None => parts.push(Tensor::zeros_on(&[n], DType::F32, device)?),
            }
        }
        parts.insert(1, Tensor::from_vec(flags, &[params.len()])?.to_device(device)?);
        Ok(cat_rows(&parts, &[self.len()], DType::F32, device)?)
    }

    /// Adds a gathered record's gradients into `params` (as a backward would have) and returns its loss; `head` is
    /// the record's loss and flags, read on the host.
    fn replay(&self, record: &Tensor, head: &[f32], params: &[qlora_autograd::Param]) -> Result<f64> {
        let mut at = 1 + params.len();
        for (i, (p, &n)) in params.iter().zip(&self.sizes).enumerate() {
            if head[1 + i] != 0.0 {
                p.accumulate_grad(&record.narrow(0, at, n)?.reshape(p.value().shape())?)?;
            }
            at += n;
        }
        Ok(head[0] as f64)
    }
}

/// Optimizer step `step` (0-based) over the global step's micro-batches `batches` (all of them, on the host), this
/// rank training its share; see the module docs for why the result is the single process's bit for bit. `phases`
/// hears this rank's forward and backward passes, then the exchange and the update as the optimizer's.
pub(crate) fn optimizer_step(
    model: &CausalLm,
    optimizer: &mut AdamW,
    group: &dyn Communicator,
    batches: &[Batch],
    step: u64,
    config: &StepConfig,
    phases: &mut dyn Phases,
) -> Result<(StepOutcome, Tokens)> {
    let (rank, n, count) = (group.rank(), group.world_size(), batches.len());
    // Every rank holds every micro-batch of the step (on the host), so each counts the step's tokens itself: no
    // collective, no wait.
    let tokens = Tokens {
        all: batches.iter().map(|b| b.ids.elem_count()).sum(),
        trained: batches.iter().map(Batch::trained_tokens).sum(),
    };
    let mine: Vec<(usize, &Batch)> = (rank..count).step_by(n).map(|j| (j, &batches[j])).collect();

    let params = model.trainable_params();
    let layout = Layout { sizes: params.iter().map(|p| p.value().elem_count()).collect() };
    // Every rank sends the same number of record slots (what the busiest rank needs); unused ones stay zero.
    let (len, slots, device) = (layout.len(), count.div_ceil(n), config.device);
    let mut records = Vec::with_capacity(slots);
    for (j, b) in &mine {
        let loss = micro_step(model, b, (step, *j), tokens.trained, config, phases)?;
        records.push(layout.record(&loss, &params, device)?);
    }
    while records.len() < slots {
        if model.sharded.is_some() {
            // Each layer's gather is a collective: a rank with fewer micro-batches than the busiest runs one more
            // (micro-batch 0 again, while it would otherwise wait) and drops its gradients.
            micro_step(model, &batches[0], (step, 0), tokens.trained, config, phases)?;
            params.iter().for_each(|p| drop(p.take_grad()));
        }
        records.push(Tensor::zeros_on(&[len], DType::F32, device)?);
    }
    phases.enter(Phase::Optimizer)?;
    // Slot by slot: slot k of every rank holds micro-batches k·n … k·n + n − 1 (micro-batch j is slot j / n of rank
    // j % n), so replaying each gathered slot before the next keeps the single process's order, and the exchange
    // holds one slot of every rank at a time (not all of them twice over: 13 GB for a 70B's r = 16 adapters, 8
    // micro-batches on 2 GPUs). Each slot's losses and flags are read back in one wait.
    let head = 1 + params.len();
    let mut losses = Vec::with_capacity(count);
    for (k, mine) in records.into_iter().enumerate() {
        let all = group.all_gather_tensor(&mine)?;
        drop(mine);
        let js = k * n..((k + 1) * n).min(count);
        let record = |j: usize| all.narrow(0, (j % n) * len, len);
        let heads = js.clone().map(|j| record(j)?.narrow(0, 0, head)).collect::<Result<Vec<_>, _>>()?;
        let heads = cat_rows(&heads, &[js.len() * head], DType::F32, device)?.try_to_vec::<f32>()?;
        for (i, j) in js.enumerate() {
            losses.push(layout.replay(&record(j)?, &heads[i * head..][..head], &params)?);
        }
    }
    let loss = losses.iter().sum::<f64>();
    let norm = optimizer.grad_norm_sq()?;
    let sq = match &norm {
        GradNorm::Host(sq) => *sq,
        GradNorm::Device(sq) => read_scalars(&[sq])?[0],
    };
    let outcome = StepOutcome { loss, grad_norm: sq.sqrt() };
    update(optimizer, &norm, outcome, step, config)?;
    phases.finish()?;
    Ok((outcome, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error reported is the failing rank's own, not the departures the others saw after it; a panicking rank
    /// is an error too.
    #[test]
    fn the_failing_ranks_error_is_the_groups() {
        let e = in_process(3, |g| {
            if g.rank() == 2 {
                bail!("rank 2 broke");
            }
            g.barrier()?;
            Ok(())
        });
        assert_eq!(e.unwrap_err().to_string(), "rank 2 broke");
        let e = in_process(2, |g| {
            assert!(g.rank() == 0, "rank 1 panics");
            g.barrier()?;
            Ok(())
        });
        assert_eq!(e.unwrap_err().to_string(), "rank 1 panicked");
        assert_eq!(in_process(3, |g| Ok(g.rank())).unwrap(), 0, "rank 0's result");
    }

    #[test]
    fn the_world_comes_from_flags_and_torchrun() {
        let launch =
            |world_size| Launch { rank: 0, world_size, local_rank: 0, local_world_size: world_size, master: None };
        assert_eq!(world(1, 1, DeviceArg::Auto, Some(&launch(1))).unwrap(), World::Alone(DeviceArg::Auto));
        let torchrun_one = Launch { master: Some(("127.0.0.1".into(), 29500)), ..launch(1) };
        assert_eq!(world(1, 1, DeviceArg::Auto, Some(&torchrun_one)).unwrap(), World::Nccl(torchrun_one.clone()));
        assert_eq!(world(1, 1, DeviceArg::Cpu, Some(&torchrun_one)).unwrap(), World::Alone(DeviceArg::Cpu));
        assert_eq!(world(1, 3, DeviceArg::Auto, None).unwrap(), World::InProcess(3), "--ranks trains on the CPU");
        assert_eq!(world(4, 1, DeviceArg::Auto, None).unwrap(), World::Spawn(4));
        assert_eq!(world(1, 1, DeviceArg::Cuda, Some(&launch(4))).unwrap(), World::Nccl(launch(4)));
        assert_eq!(
            world(4, 1, DeviceArg::Auto, Some(&launch(4))).unwrap(),
            World::Nccl(launch(4)),
            "--gpus as launched"
        );
        let e = |g, r, d, l: Option<&Launch>| world(g, r, d, l).unwrap_err().to_string();
        assert_eq!(e(1, 0, DeviceArg::Cpu, None), "--ranks must be at least 1");
        assert_eq!(e(0, 1, DeviceArg::Cpu, None), "--gpus must be at least 1");
        assert!(e(2, 1, DeviceArg::Cpu, None).starts_with("--gpus 2: training across processes runs on GPUs"));
        assert!(e(2, 2, DeviceArg::Auto, None).contains("--ranks does not combine"));
        assert!(e(1, 1, DeviceArg::Cpu, Some(&launch(4))).starts_with("WORLD_SIZE=4 (rank 0): training across"));
        assert!(e(1, 2, DeviceArg::Auto, Some(&launch(4))).contains("--ranks does not combine with a launched group"));
        assert!(e(2, 1, DeviceArg::Auto, Some(&launch(4))).contains("but --gpus 2: launch one process per GPU"));
    }
}
