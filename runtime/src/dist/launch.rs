//! torchrun's environment: how a launcher tells each process which rank it is. torchrun (and Slurm scripts written
//! for it) set `RANK`, `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this node), `LOCAL_WORLD_SIZE`, `MASTER_ADDR` and
//! `MASTER_PORT` (where rank 0 listens for the [`rendezvous`](super::rendezvous)); see
//! <https://pytorch.org/docs/stable/elastic/run.html#environment-variables>. torchrun's own agent may already serve a
//! store at `MASTER_PORT` (it says so with `TORCHELASTIC_USE_AGENT_STORE=True`, as its default static rendezvous
//! does); the rendezvous then takes `QLORA_RDZV_PORT`, else the port after `MASTER_PORT`.

use crate::{Error, Result};

/// Where this process sits in a launched group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// The GPU ordinal this process drives.
    pub local_rank: usize,
    /// The processes of the group on this node (`LOCAL_WORLD_SIZE`, else all of them): what shares its host memory.
    pub local_world_size: usize,
    /// Rank 0's rendezvous address (`MASTER_ADDR` and the port the module's doc gives); absent for a group of one,
    /// which has no one to meet.
    pub master: Option<(String, u16)>,
}

fn bad(msg: String) -> Error {
    Error::invalid("torchrun environment", msg)
}

impl Launch {
    /// The group this process was launched into, from its environment; `None` when no launcher set `RANK` or
    /// `WORLD_SIZE` (a plain single process).
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Launch::from_env`], reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let number = |name: &str| -> Result<Option<usize>> {
            let Some(text) = var(name) else { return Ok(None) };
            let n = text.trim().parse::<usize>();
            n.map(Some).map_err(|_| bad(format!("{name}={text:?} is not a whole number")))
        };
        let (rank, world_size) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (None, None) => return Ok(None),
            (Some(rank), Some(world_size)) => (rank, world_size),
            (Some(_), None) => return Err(bad("RANK is set but WORLD_SIZE is not".into())),
            (None, Some(_)) => return Err(bad("WORLD_SIZE is set but RANK is not".into())),
        };
        if world_size == 0 {
            return Err(bad("WORLD_SIZE=0: a group needs at least one process".into()));
        }
        if rank >= world_size {
            return Err(bad(format!("RANK={rank} is not below WORLD_SIZE={world_size}")));
        }
        let local_world = number("LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
        if local_world == 0 || local_world > world_size {
            return Err(bad(format!("LOCAL_WORLD_SIZE={local_world} must be in 1..=WORLD_SIZE ({world_size})")));
        }
        let local_rank = match number("LOCAL_RANK")? {
            Some(l) if l >= local_world => {
                return Err(bad(format!("LOCAL_RANK={l} is not below LOCAL_WORLD_SIZE={local_world}")))
            }
            Some(l) => l,
            None if world_size == 1 => 0,
            None => return Err(bad(format!("WORLD_SIZE={world_size} but LOCAL_RANK is not set"))),
        };
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => Some((addr.trim().to_string(), port)),
            (None, None) if world_size == 1 => None,
            (None, _) => return Err(bad(format!("WORLD_SIZE={world_size} but MASTER_ADDR is not set"))),
            (_, None) => return Err(bad(format!("WORLD_SIZE={world_size} but MASTER_PORT is not set"))),
        };
        let port_number = |name: &str, text: &str| match text.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(bad(format!("{name}={text:?} is not a port number (1-65535)"))),
        };
        let master = match master {
            None => None,
            Some((addr, _)) if addr.is_empty() => return Err(bad("MASTER_ADDR is empty".into())),
            Some((addr, port)) => {
                let port = port_number("MASTER_PORT", &port)?;
                let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.trim() == "True");
                let rdzv = match var("QLORA_RDZV_PORT") {
                    Some(text) => port_number("QLORA_RDZV_PORT", &text)?,
                    None if agent_store => port.checked_add(1).ok_or_else(|| {
                        bad(format!(
                            "MASTER_PORT={port} is torchrun's store (TORCHELASTIC_USE_AGENT_STORE=True) and the \
                             port after it does not exist: set QLORA_RDZV_PORT"
                        ))
                    })?,
                    None => port,
                };
                Some((addr, rdzv))
            }
        };
        Ok(Some(Launch { rank, world_size, local_rank, local_world_size: local_world, master }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        Launch::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    fn error(vars: &[(&str, &str)]) -> String {
        launch(vars).unwrap_err().to_string()
    }

    const TORCHRUN: [(&str, &str); 6] = [
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ];

    fn with(changes: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut vars: Vec<_> = TORCHRUN.iter().filter(|(k, _)| !changes.iter().any(|(c, _)| c == k)).copied().collect();
        vars.extend(changes.iter().filter(|(_, v)| !v.is_empty()));
        vars
    }

    #[test]
    fn torchruns_variables_are_read() {
        let got = launch(&TORCHRUN).unwrap().unwrap();
        let master = Some(("node0".into(), 29500));
        let want = Launch { rank: 3, world_size: 4, local_rank: 1, local_world_size: 2, master };
        assert_eq!(got, want);
        assert_eq!(launch(&[]).unwrap(), None, "no launcher: a single process");
        let alone = launch(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap().unwrap();
        assert_eq!(alone, Launch { rank: 0, world_size: 1, local_rank: 0, local_world_size: 1, master: None });
    }

    /// Where torchrun's agent serves its store at MASTER_PORT, the rendezvous takes the next port, or QLORA_RDZV_PORT.
    #[test]
    fn torchruns_agent_store_keeps_master_port() {
        let port =
            |changes: &[(&'static str, &'static str)]| launch(&with(changes)).unwrap().unwrap().master.unwrap().1;
        assert_eq!(port(&[]), 29500, "no agent store: MASTER_PORT itself (finetune --gpus, older launchers)");
        assert_eq!(port(&[("TORCHELASTIC_USE_AGENT_STORE", "False")]), 29500);
        assert_eq!(port(&[("TORCHELASTIC_USE_AGENT_STORE", "True")]), 29501);
        assert_eq!(port(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("QLORA_RDZV_PORT", "40000")]), 40000);
        assert_eq!(port(&[("QLORA_RDZV_PORT", "40000")]), 40000);
        let e = error(&with(&[("TORCHELASTIC_USE_AGENT_STORE", "True"), ("MASTER_PORT", "65535")]));
        assert!(e.contains("set QLORA_RDZV_PORT"), "{e}");
        assert!(error(&with(&[("QLORA_RDZV_PORT", "0")])).contains("QLORA_RDZV_PORT=\"0\" is not a port number"));
    }

    /// Each bad environment names the variable at fault (an empty value in `with` removes the variable).
    #[test]
    fn a_bad_environment_names_the_variable() {
        let cases: [(&[(&str, &str)], &str); 10] = [
            (&[("RANK", "x")], "RANK=\"x\" is not a whole number"),
            (&[("RANK", "")], "WORLD_SIZE is set but RANK is not"),
            (&[("WORLD_SIZE", "")], "RANK is set but WORLD_SIZE is not"),
            (&[("RANK", "4")], "RANK=4 is not below WORLD_SIZE=4"),
            (&[("WORLD_SIZE", "0"), ("RANK", "0")], "WORLD_SIZE=0"),
            (&[("LOCAL_RANK", "2")], "LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"),
            (&[("LOCAL_RANK", "")], "LOCAL_RANK is not set"),
            (&[("MASTER_ADDR", "")], "MASTER_ADDR is not set"),
            (&[("MASTER_PORT", "70000")], "MASTER_PORT=\"70000\" is not a port number"),
            (&[("LOCAL_WORLD_SIZE", "5")], "LOCAL_WORLD_SIZE=5 must be in 1..=WORLD_SIZE (4)"),
        ];
        for (changes, want) in cases {
            let e = error(&with(changes));
            assert!(e.starts_with("torchrun environment: ") && e.contains(want), "{changes:?}: {e}");
        }
        assert!(error(&with(&[("MASTER_ADDR", " ")])).contains("MASTER_ADDR is empty"));
    }
}
