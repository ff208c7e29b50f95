//! `finetune --gpus N` (and `bench --gpus N`): this process launches N copies of itself, one per GPU, with torchrun's
//! environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and waits for
//! them: each copy is one rank of an NCCL group ([`super::parallel::World::Nccl`]), exactly as under `torchrun
//! --nproc-per-node N`. Rank 0 prints and writes; the others print only their errors.
//!
//! When a rank fails, the others are stopped (they would otherwise wait in their next collective until its
//! deadline) and the error is the failed rank's, which it printed itself. The ranks run in a process group of their
//! own, so that an interrupt reaches each once, through this process: Ctrl-C, `kill -INT` or SIGTERM of this process
//! is passed on to every rank as SIGINT (a second one too: the ranks then quit at once), the ranks agree to stop
//! after the same step and write one checkpoint, and this process waits for them and exits as they do (130). A rank
//! whose launcher dies (SIGKILL) gets SIGTERM, so none is left holding a GPU.

use super::train::Outcome;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::Mutex;
use std::time::Duration;

/// The running ranks' process ids, which the interrupt handler passes signals on to.
static RANKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

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
        own_group_dying_with_parent(&mut cmd);
        match cmd.spawn() {
            Ok(child) => {
                lock_ranks().push(child.id());
                ranks.push(child)
            }
            Err(e) => {
                stop(&mut ranks);
                bail!("--gpus {gpus}: launching rank {rank}: {e}");
            }
        }
    }
    // An interrupt is the ranks' to act on (they agree to stop and checkpoint); this process passes it on and waits.
    ctrlc::set_handler(|| interrupt(&lock_ranks())).context("--gpus: installing the interrupt handler")?;
    let outcome = wait(ranks);
    lock_ranks().clear();
    outcome
}

fn lock_ranks() -> std::sync::MutexGuard<'static, Vec<u32>> {
    RANKS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A rank of its own process group (the terminal's Ctrl-C reaches this process alone, which passes it on: each rank
/// hears it once), sent SIGTERM if this process dies before it.
fn own_group_dying_with_parent(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) between fork and exec is async-signal-safe and touches no memory of ours. The
    // signal comes when the thread that forked exits: the launcher's main thread, which waits for the ranks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// SIGINT to each of `pids` (the ranks still running: a rank's trainer stops after the step every rank agrees on).
fn interrupt(pids: &[u32]) {
    for &pid in pids {
        let Ok(pid) = libc::pid_t::try_from(pid) else { continue };
        // SAFETY: kill(2) has no memory effects; the caller holds the list's lock, under which a rank is reaped and
        // leaves it, so the pid is an unreaped child of ours and names no other process.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
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
            // Reaped under the lock, its pid leaving the list at once: the handler never signals a reused pid.
            let status = {
                let mut pids = lock_ranks();
                let status = child.try_wait().with_context(|| format!("waiting for rank {rank}"))?;
                if status.is_some() {
                    pids.retain(|&pid| pid != child.id());
                }
                status
            };
            let Some(status) = status else { continue };
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

/// Kills the ranks still running and reaps them (under the list's lock, which they leave).
fn stop(ranks: &mut [Child]) {
    let mut pids = lock_ranks();
    for child in ranks.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
        pids.retain(|&pid| pid != child.id());
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

    /// Ranks run in process groups of their own (a terminal's Ctrl-C reaches only the launcher), and an interrupt
    /// passed on reaches each: ranks that stop on SIGINT (as the trainer does, 130) make an interrupted run.
    #[test]
    fn an_interrupt_is_passed_on_to_every_rank() {
        // Unsignalled, a rank finishes by itself after ~5 s (exit 0): the run would then be Finished, not Interrupted.
        let script = "trap 'exit 130' INT; i=0; while [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; exit 0";
        let mut ranks: Vec<Child> = (0..2)
            .map(|_| {
                let mut cmd = Command::new("sh");
                cmd.args(["-c", script]);
                own_group_dying_with_parent(&mut cmd);
                cmd.spawn().unwrap()
            })
            .collect();
        for child in &ranks {
            let pid = libc::pid_t::try_from(child.id()).unwrap();
            // SAFETY: getpgid(2) of our own child; no memory effects.
            assert_eq!(unsafe { libc::getpgid(pid) }, pid, "a rank leads its own process group");
        }
        std::thread::sleep(Duration::from_millis(200)); // the traps are set
        let started = Instant::now();
        interrupt(&ranks.iter().map(Child::id).collect::<Vec<_>>());
        assert_eq!(wait(std::mem::take(&mut ranks)).unwrap(), Outcome::Interrupted);
        assert!(started.elapsed() < Duration::from_secs(4), "stopped by the interrupt, not by running out");
    }
}
