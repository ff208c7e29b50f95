//! The rendezvous: before NCCL can connect a group, every rank needs the unique id (128 bytes) that rank 0 drew. Rank
//! 0 listens at `MASTER_ADDR` on the rendezvous port ([`Host`]; `MASTER_PORT`, or the one after it under torchrun:
//! [`Launch::master`](super::launch::Launch::master)); every other rank connects ([`join`]), says who it is, and
//! receives the id once all have arrived. Both sides give up at a deadline with an error naming what is missing,
//! never hang.
//!
//! The wire: a joining rank sends [`MAGIC`], its rank and the world size it was launched with (u32 little-endian
//! each); rank 0 checks them (a stray connection, a rank launched into another group, a rank twice), then sends
//! the id to each.

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The size of NCCL's `ncclUniqueId`.
pub const ID_BYTES: usize = qlora_kernels::cuda::nccl::UNIQUE_ID_BYTES;
/// Opens every hello, so rank 0 tells a qlora-rt rank from anything else that connects.
pub const MAGIC: [u8; 8] = *b"QLRTRDV1";
const HELLO_BYTES: usize = 16;
/// How long to wait between attempts to reach a rank 0 that is not listening yet, and between polls for joiners.
const POLL: Duration = Duration::from_millis(20);

fn failed(msg: String) -> Error {
    Error::invalid("rendezvous", msg)
}

/// Rank 0's end: a listening socket.
pub struct Host {
    listener: TcpListener,
}

impl Host {
    /// Listens on `addr:port` (port 0 picks a free one: see [`Host::port`]).
    pub fn bind(addr: &str, port: u16) -> Result<Host> {
        let listener = TcpListener::bind((addr, port)).map_err(|e| {
            failed(format!(
                "rank 0 cannot listen on {addr}:{port}: {e} (is the port taken? QLORA_RDZV_PORT chooses another)"
            ))
        })?;
        Ok(Host { listener })
    }

    /// The port it listens on.
    pub fn port(&self) -> Result<u16> {
        let addr = self.listener.local_addr().map_err(|e| failed(format!("the listening socket: {e}")))?;
        Ok(addr.port())
    }

    /// Waits until ranks 1..world_size have all joined, then sends each the id; fails at `timeout` naming the ranks
    /// that never came.
    pub fn serve(self, id: &[u8; ID_BYTES], world_size: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.listener.set_nonblocking(true).map_err(|e| failed(format!("the listening socket: {e}")))?;
        let mut joined: BTreeMap<usize, TcpStream> = BTreeMap::new();
        while joined.len() + 1 < world_size {
            match self.listener.accept() {
                Ok((stream, from)) => {
                    let rank = hello(&stream, from, world_size, deadline)?;
                    if joined.insert(rank, stream).is_some() {
                        return Err(failed(format!("rank {rank} joined twice (the second from {from})")));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..world_size).filter(|r| !joined.contains_key(r)).collect();
                        return Err(failed(format!(
                            "ranks {missing:?} did not join within {:.0?} (started? same MASTER_ADDR and port?)",
                            timeout
                        )));
                    }
                    std::thread::sleep(POLL);
                }
                Err(e) => return Err(failed(format!("accepting a rank: {e}"))),
            }
        }
        for (rank, mut stream) in joined {
            stream.write_all(id).map_err(|e| failed(format!("sending the id to rank {rank}: {e}")))?;
        }
        Ok(())
    }
}

/// Reads and checks a joiner's hello: its rank.
fn hello(mut stream: &TcpStream, from: SocketAddr, world_size: usize, deadline: Instant) -> Result<usize> {
    let io = |e: std::io::Error| failed(format!("reading the hello of {from}: {e}"));
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_read_timeout(Some(remaining(deadline))).map_err(io)?;
    let mut bytes = [0u8; HELLO_BYTES];
    stream.read_exact(&mut bytes).map_err(io)?;
    if bytes[..8] != MAGIC {
        return Err(failed(format!("{from} connected but is not a qlora-rt rank (another job on the port?)")));
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (rank, theirs) = (word(8), word(12));
    if theirs != world_size {
        return Err(failed(format!("rank {rank} was launched with WORLD_SIZE={theirs}, rank 0 with {world_size}")));
    }
    if rank == 0 || rank >= world_size {
        return Err(failed(format!("{from} says it is rank {rank}, not one of 1..{world_size}")));
    }
    Ok(rank)
}

/// Time left before `deadline`, at least a millisecond (a zero timeout means "never" to the socket calls).
fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Rank `rank`'s end: connects to rank 0 at `addr:port` (retrying until it listens), says who it is and returns
/// the id; fails at `timeout`.
pub fn join(addr: &str, port: u16, rank: usize, world_size: usize, timeout: Duration) -> Result<[u8; ID_BYTES]> {
    if rank == 0 || rank >= world_size {
        return Err(failed(format!("rank {rank} cannot join a group of {world_size}: rank 0 hosts, others join")));
    }
    let deadline = Instant::now() + timeout;
    let targets: Vec<SocketAddr> = (addr, port)
        .to_socket_addrs()
        .map_err(|e| failed(format!("MASTER_ADDR {addr}:{port} does not resolve: {e}")))?
        .collect();
    let mut stream = connect(&targets, deadline).map_err(|e| {
        failed(format!("rank {rank} could not reach rank 0 at {addr}:{port} within {timeout:.0?}: {e}"))
    })?;
    let io = |e: std::io::Error| failed(format!("rank {rank} waiting for the id from rank 0 at {addr}:{port}: {e}"));
    let mut hello = [0u8; HELLO_BYTES];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8..12].copy_from_slice(&(rank as u32).to_le_bytes());
    hello[12..].copy_from_slice(&(world_size as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    stream.set_read_timeout(Some(remaining(deadline))).map_err(io)?;
    let mut id = [0u8; ID_BYTES];
    stream.read_exact(&mut id).map_err(io)?;
    Ok(id)
}

/// The first of `targets` that accepts a connection, trying them all again until `deadline` (rank 0 may start
/// later than this rank); the last refusal when none did.
fn connect(targets: &[SocketAddr], deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let mut last = std::io::Error::new(ErrorKind::NotFound, "the address resolves to nothing");
        for target in targets {
            match TcpStream::connect_timeout(target, remaining(deadline)) {
                Ok(stream) => return Ok(stream),
                Err(e) => last = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    const SHORT: Duration = Duration::from_millis(300);
    const LONG: Duration = Duration::from_secs(20);

    fn id() -> [u8; ID_BYTES] {
        std::array::from_fn(|i| (i * 7 + 3) as u8)
    }

    #[test]
    fn every_rank_receives_rank_0s_id() {
        let host = Host::bind("127.0.0.1", 0).unwrap();
        let port = host.port().unwrap();
        // Joiners start first: they retry until rank 0 serves (the listener exists, so they connect at once).
        let joiners: Vec<_> = (1..4).map(|r| thread::spawn(move || join("127.0.0.1", port, r, 4, LONG))).collect();
        host.serve(&id(), 4, LONG).unwrap();
        for j in joiners {
            assert_eq!(j.join().unwrap().unwrap(), id());
        }
        // A group of one has no one to wait for.
        Host::bind("127.0.0.1", 0).unwrap().serve(&id(), 1, SHORT).unwrap();
    }

    #[test]
    fn missing_ranks_are_named_at_the_deadline() {
        let host = Host::bind("127.0.0.1", 0).unwrap();
        let port = host.port().unwrap();
        let one = thread::spawn(move || join("127.0.0.1", port, 2, 4, LONG));
        let e = host.serve(&id(), 4, SHORT).unwrap_err().to_string();
        assert!(e.contains("ranks [1, 3] did not join"), "{e}");
        let e = one.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 2 waiting for the id from rank 0"), "{e}");
    }

    #[test]
    fn an_absent_rank_0_is_a_timeout_not_a_hang() {
        let port = Host::bind("127.0.0.1", 0).unwrap().port().unwrap(); // free once the host is dropped
        let e = join("127.0.0.1", port, 1, 2, SHORT).unwrap_err().to_string();
        assert!(e.starts_with("rendezvous: rank 1 could not reach rank 0 at 127.0.0.1:"), "{e}");
        let e = join("127.0.0.1", port, 0, 2, SHORT).unwrap_err().to_string();
        assert!(e.contains("rank 0 hosts"), "{e}");
        let e = Host::bind("no such host.invalid", 1).err().unwrap().to_string();
        assert!(e.contains("rank 0 cannot listen on no such host.invalid:1"), "{e}");
    }

    /// A rank of another group, a rank claimed twice and a stranger each stop rank 0 with their reason.
    #[test]
    fn wrong_joiners_are_refused() {
        let serve = |joiner: Box<dyn FnOnce(u16) + Send>| {
            let host = Host::bind("127.0.0.1", 0).unwrap();
            let port = host.port().unwrap();
            let t = thread::spawn(move || joiner(port));
            let e = host.serve(&id(), 3, LONG).unwrap_err().to_string();
            t.join().unwrap();
            e
        };
        let e = serve(Box::new(|port| drop(join("127.0.0.1", port, 1, 5, SHORT))));
        assert!(e.contains("rank 1 was launched with WORLD_SIZE=5, rank 0 with 3"), "{e}");
        let e = serve(Box::new(|port| {
            let a = thread::spawn(move || join("127.0.0.1", port, 1, 3, SHORT));
            let _ = join("127.0.0.1", port, 1, 3, SHORT);
            let _ = a.join();
        }));
        assert!(e.contains("rank 1 joined twice"), "{e}");
        let e = serve(Box::new(|port| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        }));
        assert!(e.contains("is not a qlora-rt rank"), "{e}");
    }
}
