//! `--adapter [NAME=]DIR`, repeatable on `generate` and `eval`: several PEFT adapters over one base loaded once.
//! A bare `--adapter DIR` is one unnamed adapter, as before adapters could be swapped; with several, each needs a
//! name, which `generate --prompts` lines refer to and `eval` reports under.

use anyhow::{bail, Context, Result};
use qlora_models::adapters::ModelAdapter;
use qlora_models::formats::peft::read_adapter;
use qlora_models::transformer::CausalLm;
use std::path::PathBuf;
use std::str::FromStr;

/// One `--adapter` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterArg {
    pub name: Option<String>,
    pub dir: PathBuf,
}

/// A name is letters, digits, `_`, `-` and `.`: never a path, so `NAME=DIR` cannot be mistaken for a folder.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl FromStr for AdapterArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("expected DIR or NAME=DIR".into());
        }
        // A folder in the current directory whose name has `=` in it is given as `./k=v`.
        let named = s.split_once('=').filter(|(name, _)| is_name(name));
        match named {
            Some((_, "")) => Err(format!("{s}: no folder after `=` (expected NAME=DIR)")),
            Some((name, dir)) => Ok(AdapterArg { name: Some(name.into()), dir: dir.into() }),
            None => Ok(AdapterArg { name: None, dir: s.into() }),
        }
    }
}

impl AdapterArg {
    /// The name it goes by: its NAME, or its folder when given bare.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.dir.display().to_string())
    }
}

/// An adapter read from its folder, with the name it goes by (its folder, when given bare).
pub struct NamedAdapter {
    pub name: String,
    pub arg: AdapterArg,
    pub adapter: ModelAdapter,
}

/// Reads every `--adapter` against `model`'s projections. Several adapters must all be named, each name once.
pub fn read_all(args: &[AdapterArg], model: &CausalLm) -> Result<Vec<NamedAdapter>> {
    if args.len() > 1 {
        if let Some(bare) = args.iter().find(|a| a.name.is_none()) {
            bail!("--adapter {}: with several adapters give each as NAME=DIR", bare.dir.display());
        }
    }
    let shapes: Vec<(String, [usize; 2])> =
        model.projections().iter().map(|p| (p.name.clone(), p.base.shape())).collect();
    let mut read: Vec<NamedAdapter> = Vec::with_capacity(args.len());
    for arg in args {
        let name = arg.label();
        if read.iter().any(|r| r.name == name) {
            bail!("--adapter {name}=...: the name {name:?} is given twice");
        }
        let adapter = read_adapter(&arg.dir, &shapes).with_context(|| format!("--adapter {}", arg.dir.display()))?;
        if adapter.is_empty() {
            bail!("--adapter {}: adapts no projection of this model", arg.dir.display());
        }
        read.push(NamedAdapter { name, arg: arg.clone(), adapter });
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_only_where_they_cannot_be_paths() {
        let parse = |s: &str| s.parse::<AdapterArg>();
        assert_eq!(parse("out/run1"), Ok(AdapterArg { name: None, dir: "out/run1".into() }));
        assert_eq!(parse("pirate=out/run1"), Ok(AdapterArg { name: Some("pirate".into()), dir: "out/run1".into() }));
        assert_eq!(parse("a.b-c_1=x=y"), Ok(AdapterArg { name: Some("a.b-c_1".into()), dir: "x=y".into() }));
        // A `/` before the `=` makes it a path.
        assert_eq!(parse("runs/lr=1e-3"), Ok(AdapterArg { name: None, dir: "runs/lr=1e-3".into() }));
        assert!(parse("pirate=").unwrap_err().contains("NAME=DIR"));
        assert_eq!(parse("./k=v"), Ok(AdapterArg { name: None, dir: "./k=v".into() }));
        assert!(parse("").is_err());
    }
}
