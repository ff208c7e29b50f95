//! Resumable state on disk. `OUT/checkpoint-STEP/` holds the adapter as PEFT files, the optimizer state
//! (`optimizer.safetensors`: AdamW's moments in f64, its step count in the metadata) and `trainer_state.json`
//! (step, epoch and position in it, seed, the trajectory-shaping settings and their hash, tokens and time so far).
//!
//! A checkpoint is written into a hidden folder (every file atomically) and renamed into place, so a
//! `checkpoint-STEP` folder is complete or absent: a kill at any moment leaves the earlier ones intact.

use super::data::Fnv;
use anyhow::{anyhow, bail, ensure, Context, Result};
use qlora_models::formats::fsutil::write_atomic;
use qlora_models::formats::peft::save_adapter;
use qlora_models::transformer::CausalLm;
use qlora_optim::{AdamW, AdamWState, ParamMoments};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const PREFIX: &str = "checkpoint-";
/// Where a checkpoint is assembled before it is renamed to `checkpoint-STEP`.
const PARTIAL_PREFIX: &str = ".partial-checkpoint-";
const EXP_AVG: &str = ".exp_avg";
const EXP_AVG_SQ: &str = ".exp_avg_sq";

/// Where training stands after `step` optimizer steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub epoch: u64,
    /// Micro-batches of `epoch` already trained on.
    pub epoch_position: usize,
    pub seed: u64,
    /// Input tokens trained on so far, and seconds spent, carried across resumes for the metrics.
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub config_hash: String,
    /// The settings that shape the loss trajectory (see `FinetuneArgs::trajectory`), to name what differs when
    /// a resume is refused.
    pub config: Value,
}

impl TrainerState {
    pub fn fresh(seed: u64, config: &Value) -> Self {
        TrainerState {
            step: 0,
            epoch: 0,
            epoch_position: 0,
            seed,
            tokens_seen: 0,
            elapsed_s: 0.0,
            config_hash: config_hash(config),
            config: config.clone(),
        }
    }
}

/// FNV-1a of the settings' JSON (keys in a fixed order).
fn config_hash(config: &Value) -> String {
    let mut h = Fnv::default();
    h.write(config.to_string().as_bytes());
    format!("{:016x}", h.0)
}

/// Complete checkpoints in `out`, oldest first.
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", out.display()))?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix(PREFIX)?.parse().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Removes checkpoints a killed run left half-assembled.
pub fn remove_partials(out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(out).with_context(|| format!("reading {}", out.display()))? {
        let path = entry.with_context(|| format!("reading {}", out.display()))?.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(PARTIAL_PREFIX)) {
            std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

fn optimizer_bytes(state: &AdamWState) -> Result<Vec<u8>> {
    let mut data: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for m in &state.moments {
        for (suffix, values) in [(EXP_AVG, &m.exp_avg), (EXP_AVG_SQ, &m.exp_avg_sq)] {
            let bytes = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            data.push((format!("{}{suffix}", m.name), bytes, values.len()));
        }
    }
    let views = data
        .iter()
        .map(|(name, bytes, n)| Ok((name.clone(), TensorView::new(Dtype::F64, vec![*n], bytes)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let metadata = HashMap::from([("step".to_string(), state.step.to_string())]);
    Ok(safetensors::serialize(views, Some(metadata))?)
}

fn read_optimizer(path: &Path) -> Result<AdamWState> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |msg: String| anyhow!("{}: {msg}", path.display());
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no \"step\" in the metadata".into()))?;
    let f64s = |name: &str| -> Result<Vec<f64>> {
        let t = file.tensor(name).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        ensure!(t.dtype() == Dtype::F64, "{}: tensor {name}: expected F64, found {:?}", path.display(), t.dtype());
        Ok(t.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8"))).collect())
    };
    let mut names: Vec<&str> = file.names().into_iter().filter_map(|n| n.strip_suffix(EXP_AVG)).collect();
    names.sort();
    let moments = names
        .into_iter()
        .map(|name| {
            Ok(ParamMoments {
                name: name.to_string(),
                exp_avg: f64s(&format!("{name}{EXP_AVG}"))?,
                exp_avg_sq: f64s(&format!("{name}{EXP_AVG_SQ}"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(AdamWState { step, moments })
}

/// What `save` needs besides the state.
pub struct SaveTo<'a> {
    pub out: &'a Path,
    pub base_model: &'a str,
    /// Keep this many checkpoints, the newest (0: all).
    pub keep_last: usize,
}

/// Writes `OUT/checkpoint-{state.step}` and prunes old ones; returns the folder.
pub fn save(to: &SaveTo, model: &CausalLm, optimizer: &AdamW, state: &TrainerState) -> Result<PathBuf> {
    let name = format!("{PREFIX}{}", state.step);
    let (partial, dir) = (to.out.join(format!("{PARTIAL_PREFIX}{}", state.step)), to.out.join(&name));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing {}", partial.display()))?;
    }
    save_adapter(model, &partial, Some(to.base_model))?;
    write_atomic(&partial.join(OPTIMIZER_FILE), &optimizer_bytes(&optimizer.state()?)?)?;
    let json = serde_json::to_string_pretty(state).context("serialising the trainer state")?;
    write_atomic(&partial.join(STATE_FILE), json.as_bytes())?;
    if dir.exists() {
        // Resumed from an earlier checkpoint: this step's old folder belongs to the abandoned branch.
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&partial, &dir).with_context(|| format!("renaming {} to {name}", partial.display()))?;
    std::fs::File::open(to.out).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", to.out.display()))?;
    if to.keep_last > 0 {
        let all = list(to.out)?;
        for (_, old) in &all[..all.len().saturating_sub(to.keep_last)] {
            std::fs::remove_dir_all(old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(dir)
}

/// Reads a checkpoint's trainer and optimizer state, refusing one trained with other settings (naming them).
/// The adapter is read by the caller with `load_adapter`.
pub fn load(dir: &Path, config: &Value) -> Result<(TrainerState, AdamWState)> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a checkpoint folder (no {STATE_FILE})", dir.display()))?;
    let state: TrainerState = serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    if state.config_hash != config_hash(config) {
        let empty = serde_json::Map::new();
        let (old, new) = (state.config.as_object().unwrap_or(&empty), config.as_object().unwrap_or(&empty));
        let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
        keys.sort();
        keys.dedup();
        let differs: Vec<String> = keys
            .into_iter()
            .filter(|k| old.get(*k) != new.get(*k))
            .map(|k| {
                let show = |v: Option<&Value>| v.map_or("(unset)".to_string(), Value::to_string);
                format!("{k} {} → {}", show(old.get(k)), show(new.get(k)))
            })
            .collect();
        bail!(
            "{} was trained with other settings ({}); resume with the same flags and data, or start a new --out",
            dir.display(),
            if differs.is_empty() { "the config hash differs".to_string() } else { differs.join(", ") }
        );
    }
    let optimizer = read_optimizer(&dir.join(OPTIMIZER_FILE))?;
    ensure!(
        optimizer.step == state.step,
        "{}: the optimizer state is at step {} but the trainer state at {}",
        dir.display(),
        optimizer.step,
        state.step
    );
    Ok((state, optimizer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_state_round_trips_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let state = AdamWState {
            step: 7,
            moments: vec![
                ParamMoments {
                    name: "b.lora_A.weight".into(),
                    exp_avg: vec![0.1, -3e-300],
                    exp_avg_sq: vec![1.0, 2.5],
                },
                ParamMoments {
                    name: "a.lora_B.weight".into(),
                    exp_avg: vec![f64::MIN_POSITIVE],
                    exp_avg_sq: vec![0.0],
                },
            ],
        };
        let path = dir.path().join(OPTIMIZER_FILE);
        std::fs::write(&path, optimizer_bytes(&state).unwrap()).unwrap();
        let mut back = read_optimizer(&path).unwrap();
        back.moments.sort_by(|a, b| b.name.cmp(&a.name));
        assert_eq!(back, state);
    }

    #[test]
    fn a_changed_setting_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let old = serde_json::json!({"lr": 0.0002, "r": 16});
        let state = TrainerState::fresh(1, &old);
        std::fs::write(dir.path().join(STATE_FILE), serde_json::to_string(&state).unwrap()).unwrap();
        let e = load(dir.path(), &serde_json::json!({"lr": 0.001, "r": 16})).unwrap_err().to_string();
        assert!(e.contains("lr 0.0002 → 0.001") && !e.contains("r 16"), "{e}");
        let e = load(&dir.path().join("nowhere"), &old).unwrap_err().to_string();
        assert!(e.contains("not a checkpoint folder"), "{e}");
    }

    #[test]
    fn only_complete_checkpoints_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        for (name, complete) in [("checkpoint-10", true), ("checkpoint-2", true), ("checkpoint-30", false)] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            if complete {
                std::fs::write(dir.path().join(name).join(STATE_FILE), "{}").unwrap();
            }
        }
        std::fs::create_dir(dir.path().join(format!("{PARTIAL_PREFIX}40"))).unwrap();
        let steps: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 10]);
        remove_partials(dir.path()).unwrap();
        assert!(!dir.path().join(format!("{PARTIAL_PREFIX}40")).exists());
    }
}
