//! `finetune --gpus N` (and `bench --gpus N`): this process launches N copies of itself, one per GPU, with torchrun's
//! environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and waits for
//! them: each copy is one rank of an NCCL group ([`super::parallel::World::Nccl`]), exactly as under `torchrun
//! --nproc-per-node N`. Rank 0 prints and writes; the others print only their errors.
//!
//! When a rank fails, the others are stopped (they would otherwise wait in their next collective until its
//! deadline) and the error is the failed rank's, which it printed itself. Ctrl-C reaches every process of the
//! terminal's group: the ranks agree to stop after the same step and write one checkpoint, and this process waits
//! for them and exits as they do (130).

use super::train::Outcome;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

/// Launches the `gpus` ranks and waits for them.
pub(crate) fn gpus(gpus: usize) -> Result<Outcome> {
    let visible = qlora_runtime::device_count().map_err(|e| anyhow!("--gpus {gpus}: {e}"))?;
    ensure!(
        visible >= gpus,
        "--gpus {gpus}: {visible} CUDA GPU(s) visible (check CUDA_VISIBLE_DEVICES, or lower --gpus)"
    );
    qlora_runtime::dist::nccl::available().map_err(|e| anyhow!("--gpus {gpus}: {e}"))?;
    let port = free_port()?;
    let exe = std::env::current_exe().context("--gpus: finding this program to launch its ranks")?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let mut ranks: Vec<Child> = Vec::with_capacity(gpus);
    for rank in 0..gpus {
        let (r, n) = (rank.to_string(), gpus.to_string());
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .envs([("RANK", &r), ("LOCAL_RANK", &r), ("WORLD_SIZE", &n), ("LOCAL_WORLD_SIZE", &n)])
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string());
        // NVLink multicast stays off (forbidden on the GPU machines this runs on) unless the caller says otherwise;
        // set here, before the rank starts, rather than by the rank among its threads.
        if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
            cmd.env("NCCL_NVLS_ENABLE", "0");
        }
        match cmd.spawn() {
            Ok(child) => ranks.push(child),
            Err(e) => {
                stop(&mut ranks);
                bail!("--gpus {gpus}: launching rank {rank}: {e}");
            }
        }
    }
    // The terminal's Ctrl-C is the ranks' to act on (they agree to stop and checkpoint); this process only waits.
    ctrlc::set_handler(|| {}).context("--gpus: installing the interrupt handler")?;
    wait(ranks)
}

/// A port nobody listens on now, for rank 0's rendezvous. Another program could take it before rank 0 binds it;
/// rank 0 then fails in one line naming the port, and a second run picks another.
fn free_port() -> Result<u16> {
    let socket = std::net::TcpListener::bind(("127.0.0.1", 0)).context("--gpus: finding a free port")?;
    Ok(socket.local_addr().context("--gpus: finding a free port")?.port())
}

/// Waits until every rank has exited or one has failed (the others are then stopped).
fn wait(mut ranks: Vec<Child>) -> Result<Outcome> {
    let mut done: Vec<Option<ExitStatus>> = vec![None; ranks.len()];
    loop {
        for (rank, child) in ranks.iter_mut().enumerate() {
            if done[rank].is_some() {
                continue;
            }
            let Some(status) = child.try_wait().with_context(|| format!("waiting for rank {rank}"))? else { continue };
            done[rank] = Some(status);
            if !status.success() && status.code() != Some(130) {
                stop(&mut ranks);
                bail!("rank {rank} of {} failed ({status}); its error is above", done.len());
            }
        }
        if done.iter().all(Option::is_some) {
            let interrupted = done.iter().flatten().any(|s| s.code() == Some(130));
            return Ok(if interrupted { Outcome::Interrupted } else { Outcome::Finished });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the ranks still running and reaps them.
fn stop(ranks: &mut [Child]) {
    for child in ranks.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn ranks(scripts: &[&str]) -> Vec<Child> {
        scripts.iter().map(|s| Command::new("sh").args(["-c", s]).spawn().unwrap()).collect()
    }

    /// Every rank finishing is a finished run; an interrupted rank (130) makes it interrupted; a failing rank stops
    /// the others at once (a rank that would run for a minute is killed) and names itself.
    #[test]
    fn the_ranks_outcome_is_the_runs() {
        assert_eq!(wait(ranks(&["exit 0", "exit 0"])).unwrap(), Outcome::Finished);
        assert_eq!(wait(ranks(&["exit 130", "exit 0"])).unwrap(), Outcome::Interrupted);
        let started = Instant::now();
        let e = wait(ranks(&["sleep 60", "exit 3"])).unwrap_err().to_string();
        assert!(e.starts_with("rank 1 of 2 failed (exit status: 3)"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(30), "the sleeping rank was stopped");
    }
}
