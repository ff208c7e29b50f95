//! `--config FILE.toml`: finetune flags from a file. The table's keys are flag names without the dashes
//! (`max_seq_len` works for `max-seq-len`); values are strings, numbers, booleans (for switches: `rslora = true`,
//! `double-quant = false`) or lists (joined with commas, for `target-modules`). They become `--flag=value`
//! arguments placed before the command line's own, and with `args_override_self` the last occurrence of a flag
//! wins, so the command line overrides the file. An unknown key is an error naming the file and the key.

use super::FinetuneArgs;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Command};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Flags that replace each other (clap `overrides_with`): the command line may pick either, but a file that
/// sets both is ambiguous.
const EXCLUSIVE: [(&str, &str); 6] = [
    ("epochs", "max-steps"),
    ("warmup-ratio", "warmup-steps"),
    ("micro-batch", "batch-tokens"),
    ("eval-file", "eval-split"),
    ("double-quant", "no-double-quant"),
    ("gradient-checkpointing", "no-gradient-checkpointing"),
];

/// A long flag of `finetune` and how it takes a value.
struct Flag {
    name: String,
    takes_value: bool,
    /// `--resume` may stand alone or take a folder.
    value_optional: bool,
}

fn flags() -> Vec<Flag> {
    let cmd = FinetuneArgs::augment_args(Command::new("finetune"));
    cmd.get_arguments()
        .filter_map(|a| {
            let name = a.get_long()?.to_string();
            let takes_value = a.get_action().takes_values();
            let value_optional = a.get_num_args().is_some_and(|n| n.min_values() == 0);
            Some(Flag { name, takes_value, value_optional })
        })
        .filter(|f| f.name != "config" && f.name != "help")
        .collect()
}

/// The path of the last `--config` in a finetune command line, if any.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut found = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            found = it.next().map(PathBuf::from);
        } else if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            found = Some(PathBuf::from(v));
        }
    }
    found
}

/// The process's arguments with a `finetune --config FILE` expanded: the file's flags are inserted right after
/// the subcommand name. Other commands, and `--help`, pass through unchanged.
pub fn expand_config(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    if argv.get(1).is_none_or(|a| a != "finetune") || argv.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(argv);
    }
    let Some(path) = config_path(&argv[2..]) else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("--config {}", path.display()))?;
    let mut out = argv[..2].to_vec();
    out.extend(toml_args(&path, &text)?.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// One scalar as a flag value.
fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// The TOML table as `--flag[=value]` arguments.
fn toml_args(path: &Path, text: &str) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map_or(1, |s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        anyhow!("{}: line {line}: {}", path.display(), e.message().trim())
    })?;
    let known = flags();
    let find = |name: &str| known.iter().find(|f| f.name == name);
    let at = |key: &str| format!("{}: key \"{key}\"", path.display());
    let names: Vec<String> = table.keys().map(|k| k.replace('_', "-")).collect();
    for (a, b) in EXCLUSIVE {
        if names.iter().any(|n| n == a) && names.iter().any(|n| n == b) {
            bail!("{}: sets both \"{a}\" and \"{b}\"; keep one", path.display());
        }
    }
    let mut args = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        if name == "config" {
            bail!("{}: a config file cannot name another config file", at(key));
        }
        let negated = format!("no-{name}");
        match (find(&name), value) {
            (Some(f), toml::Value::Boolean(b)) if !f.takes_value || f.value_optional => {
                if *b {
                    args.push(format!("--{name}"));
                } else if find(&negated).is_some() {
                    args.push(format!("--{negated}"));
                }
            }
            (None, toml::Value::Boolean(b)) if find(&negated).is_some() => {
                if !b {
                    args.push(format!("--{negated}"));
                }
            }
            (Some(f), _) if !f.takes_value => bail!("{}: --{name} is a switch: use true or false", at(key)),
            (Some(_), toml::Value::Boolean(_)) => bail!("{}: --{name} takes a value, not true or false", at(key)),
            (Some(_), toml::Value::Array(items)) => {
                let parts: Option<Vec<String>> = items.iter().map(scalar).collect();
                let parts = parts.ok_or_else(|| anyhow!("{}: list items must be strings or numbers", at(key)))?;
                args.push(format!("--{name}={}", parts.join(",")));
            }
            (Some(_), v) => match scalar(v) {
                Some(s) => args.push(format!("--{name}={s}")),
                None => bail!("{}: expected a string, number, boolean or list", at(key)),
            },
            (None, _) => bail!("{}: unknown setting (not a finetune flag; see qlora-rt finetune --help)", at(key)),
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Result<Vec<String>> {
        toml_args(Path::new("run.toml"), text)
    }

    #[test]
    fn values_switches_and_lists_become_flags() {
        let got = args(
            "lr = 1e-3\nmax_seq_len = 256\nquantize = \"none\"\nrslora = true\ndora = false\n\
             double-quant = false\npacking = false\ntarget-modules = [\"q_proj\", \"v_proj\"]\nresume = true\n",
        )
        .unwrap();
        let mut want = vec![
            "--lr=0.001",
            "--max-seq-len=256",
            "--quantize=none",
            "--rslora",
            "--no-double-quant",
            "--no-packing",
            "--target-modules=q_proj,v_proj",
            "--resume",
        ];
        let mut got_sorted = got.clone();
        got_sorted.sort();
        want.sort();
        assert_eq!(got_sorted, want);
    }

    #[test]
    fn mistakes_name_the_file_and_key() {
        let e = args("lr = 1e-3\nlearning_rate = 2\n").unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("learning_rate") && e.contains("unknown"), "{e}");
        let e = args("rslora = \"yes\"").unwrap_err().to_string();
        assert!(e.contains("\"rslora\"") && e.contains("switch"), "{e}");
        let e = args("lr = true").unwrap_err().to_string();
        assert!(e.contains("takes a value"), "{e}");
        let e = args("epochs = 2\nmax-steps = 10").unwrap_err().to_string();
        assert!(e.contains("\"epochs\" and \"max-steps\""), "{e}");
        let e = args("lr = 1e-3\nr = = 4\n").unwrap_err().to_string();
        assert!(e.starts_with("run.toml: line 2:") && !e.contains('\n'), "{e}");
        let e = args("config = \"other.toml\"").unwrap_err().to_string();
        assert!(e.contains("another config"), "{e}");
    }

    #[test]
    fn exclusive_pairs_are_real_flags() {
        let known = flags();
        for name in EXCLUSIVE.iter().flat_map(|(a, b)| [a, b]) {
            assert!(known.iter().any(|f| f.name == *name), "{name}");
        }
    }

    #[test]
    fn only_finetune_with_config_is_expanded() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let plain = os(&["qlora-rt", "toy", "--config", "x.toml"]);
        assert_eq!(expand_config(plain.clone()).unwrap(), plain);
        let e = expand_config(os(&["qlora-rt", "finetune", "--config=/nonexistent.toml"])).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent.toml"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "r = 4\n").unwrap();
        let f = file.to_str().unwrap();
        let got = expand_config(os(&["qlora-rt", "finetune", "--r", "8", "--config", f])).unwrap();
        assert_eq!(got, os(&["qlora-rt", "finetune", "--r=4", "--r", "8", "--config", f]));
    }
}
