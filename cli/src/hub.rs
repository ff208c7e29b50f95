//! `--model ORG/NAME`: a model of the Hugging Face Hub, found in the Hub's cache as `huggingface_hub` lays it out
//! (`<cache>/models--ORG--NAME/refs/<revision>` holding a commit hash, `snapshots/<hash>/` the files), and
//! downloaded into that same cache (the `hf-hub` crate) when it is not there and the network allows. Owns the
//! cache's location and the `--revision` the command line gave; [`crate::model_path::resolve_model`] decides
//! when a `--model` is a Hub id.

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The `--revision` of this run (a branch, a tag or a commit hash), set once by `main`.
static REVISION: OnceLock<String> = OnceLock::new();

/// Records the command line's `--revision`; without one, Hub models resolve to `main`.
pub fn set_revision(revision: Option<String>) {
    if let Some(r) = revision {
        // main calls this once, before any command runs.
        let _ = REVISION.set(r);
    }
}

fn revision() -> &'static str {
    REVISION.get().map_or("main", String::as_str)
}

fn var(key: &str) -> Option<PathBuf> {
    std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The Hub cache, as `huggingface_hub` finds it: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `${XDG_CACHE_HOME:-~/.cache}/huggingface/hub`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Ok(dir);
    }
    if let Some(home) = var("HF_HOME") {
        return Ok(home.join("hub"));
    }
    let cache = match (var("XDG_CACHE_HOME"), var("HOME")) {
        (Some(xdg), _) => xdg,
        (None, Some(home)) => home.join(".cache"),
        (None, None) => bail!("no Hugging Face cache folder: set HF_HUB_CACHE (or HF_HOME or HOME)"),
    };
    Ok(cache.join("huggingface").join("hub"))
}

/// Whether `text` reads as a Hub model id `ORG/NAME` (the Hub's characters: letters, digits, `-`, `_`, `.`).
pub fn is_repo_id(text: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(text.split_once('/'), Some((org, name)) if part(org) && part(name))
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Where `<cache>/models--ORG--NAME` keeps revision `revision`: the snapshot folder, or the ref file that would
/// name it when the ref is missing.
fn snapshot(repo_dir: &Path, revision: &str) -> std::result::Result<PathBuf, PathBuf> {
    if is_commit(revision) {
        return Ok(repo_dir.join("snapshots").join(revision.to_ascii_lowercase()));
    }
    let reference = repo_dir.join("refs").join(revision);
    match std::fs::read_to_string(&reference) {
        Ok(hash) if !hash.trim().is_empty() => Ok(repo_dir.join("snapshots").join(hash.trim())),
        _ => Err(reference),
    }
}

const INDEX: &str = "model.safetensors.index.json";

/// The shard files a safetensors index lists, or None when it cannot be read.
fn shards(index: &Path) -> Option<Vec<String>> {
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(index).ok()?).ok()?;
    let mut files: Vec<String> =
        index.get("weight_map")?.as_object()?.values().filter_map(|v| Some(v.as_str()?.to_string())).collect();
    files.sort();
    files.dedup();
    Some(files)
}

/// Whether a snapshot holds a whole model: config.json and the weights as `Checkpoint::open` reads them (the
/// shards its index lists, else model.safetensors). A download cut short leaves some out, and is then completed.
fn is_complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    if !dir.join(INDEX).exists() {
        return dir.join("model.safetensors").is_file();
    }
    shards(&dir.join(INDEX)).is_some_and(|files| files.iter().all(|f| dir.join(f).is_file()))
}

/// The files of a repository that a model folder needs besides its weights: config, tokenizer and generation
/// files at the top level.
fn wanted(name: &str) -> bool {
    !name.contains('/') && (name == "config.json" || crate::model_path::is_companion_file(name))
}

/// The snapshot folder of Hub model `id` at this run's revision: from the cache, else downloaded into it.
pub fn resolve(id: &str) -> Result<PathBuf> {
    let cache = cache_dir()?;
    let repo_dir = cache.join(format!("models--{}", id.replace('/', "--")));
    let rev = revision();
    // A ref names a file under refs/ (`refs/pr/1` included): never one outside it.
    if rev.is_empty() || rev.starts_with('/') || rev.split('/').any(|part| part == ".." || part.is_empty()) {
        bail!("--revision {rev:?} is not a branch, tag or commit name");
    }
    let looked = match snapshot(&repo_dir, rev) {
        Ok(dir) if is_complete(&dir) => return Ok(dir),
        Ok(dir) => dir,
        Err(reference) => reference,
    };
    let not_cached = format!(
        "--model {id} (revision {rev}): no folder {id} here and not in the Hugging Face cache (looked in {})",
        looked.display()
    );
    if std::env::var_os("HF_HUB_OFFLINE").is_some_and(|v| !v.is_empty() && v != "0") {
        bail!("{not_cached}, and HF_HUB_OFFLINE forbids downloading it");
    }
    download(id, rev, &cache, &repo_dir).with_context(|| format!("{not_cached}; downloading it failed"))
}

/// A model folder's name for people: `ORG/NAME` for a Hub cache snapshot, else the folder's own name.
pub fn display_name(dir: &Path) -> String {
    cached_repo_id(dir)
        .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| dir.display().to_string())
}

/// ORG/NAME when `dir` is a snapshot in a Hugging Face cache (`models--ORG--NAME/snapshots/<rev>`).
pub fn cached_repo_id(dir: &Path) -> Option<String> {
    let parts: Vec<String> = dir.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    parts.windows(3).rev().find_map(|w| match (w[0].strip_prefix("models--"), w[1].as_str()) {
        (Some(repo), "snapshots") => repo.split_once("--").map(|(org, name)| format!("{org}/{name}")),
        _ => None,
    })
}

/// One line for a failed Hub request: hf-hub's message alone (ureq's already names its causes, which the error
/// chain would repeat), and for a refusal (401, 403) what a gated or private model needs.
fn hub_error(e: ApiError) -> anyhow::Error {
    let refused = matches!(&e, ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(401 | 403, _)));
    anyhow!("{e}{}", if refused { " (a gated or private model needs HF_TOKEN with access to it)" } else { "" })
}

/// Downloads the model files of `id` at `rev` into `cache` (its folder there: `repo_dir`) and returns their
/// snapshot folder.
fn download(id: &str, rev: &str, cache: &Path, repo_dir: &Path) -> Result<PathBuf> {
    let mut api = ApiBuilder::from_cache(Cache::new(cache.to_path_buf())).with_progress(true);
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        api = api.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    // HF_TOKEN wins over the token file `huggingface-cli login` leaves beside the cache (read by from_cache).
    if let Ok(token) = std::env::var("HF_TOKEN") {
        api = api.with_token(Some(token).filter(|t| !t.is_empty()));
    }
    let repo =
        api.build().map_err(hub_error)?.repo(Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()));
    let info = repo.info().map_err(hub_error).context("listing its files")?;
    // Files land in snapshots/<the commit each download reports>, which is the revision's commit.
    let dir = repo_dir.join("snapshots").join(&info.sha);
    // hf-hub's `get` would take a file from the snapshot refs/<rev> named before; only this commit's will do.
    let fetch = |file: &str| -> Result<PathBuf> {
        let path = dir.join(file);
        if !path.is_file() {
            repo.download(file).map_err(hub_error).with_context(|| format!("fetching {file}"))?;
        }
        Ok(path)
    };
    let listed: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut files: Vec<String> = listed.iter().filter(|n| wanted(n)).map(|n| n.to_string()).collect();
    // The weights as Checkpoint::open reads them; other copies (consolidated.safetensors, pytorch_model.bin,
    // GGUF) are left on the Hub.
    if listed.contains(&INDEX) {
        let index = fetch(INDEX)?;
        files.extend(shards(&index).with_context(|| format!("{}: no weight_map of file names", index.display()))?);
    } else if listed.contains(&"model.safetensors") {
        files.push("model.safetensors".into());
    } else {
        bail!("revision {} has no model.safetensors nor {INDEX} (other weight formats are not read)", info.sha);
    }
    eprintln!("qlora-rt: downloading {id} ({} files) into {}", files.len(), cache.display());
    for file in &files {
        fetch(file)?;
    }
    if !is_complete(&dir) {
        bail!("{} is incomplete after the download", dir.display());
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_revisions() {
        for id in ["meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M-Instruct", "a/b.c_d"] {
            assert!(is_repo_id(id), "{id}");
        }
        for not in ["model", "/abs/path", "./dir/x", "a/b/c", "org/", "../x", "a/.x", "a b/c"] {
            assert!(!is_repo_id(not), "{not}");
        }
        let dir = tempfile::tempdir().unwrap();
        let hash = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(snapshot(dir.path(), hash).unwrap(), dir.path().join("snapshots").join(hash));
        assert_eq!(snapshot(dir.path(), "v1").unwrap_err(), dir.path().join("refs/v1"));
        std::fs::create_dir_all(dir.path().join("refs")).unwrap();
        std::fs::write(dir.path().join("refs/v1"), format!("{hash}\n")).unwrap();
        assert_eq!(snapshot(dir.path(), "v1").unwrap(), dir.path().join("snapshots").join(hash));
        assert!(wanted("tokenizer.json") && wanted("config.json") && wanted("generation_config.json"));
        assert!(!wanted("pytorch_model.bin") && !wanted("onnx/tokenizer.json") && !wanted("README.md"));
    }

    #[test]
    fn display_names() {
        let snapshot = Path::new("/c/hub/models--meta-llama--Llama-3.2-1B/snapshots/0123abc");
        assert_eq!(display_name(snapshot), "meta-llama/Llama-3.2-1B");
        assert_eq!(display_name(Path::new("tests/fixtures/models/llama")), "llama");
    }

    #[test]
    fn a_snapshot_missing_a_shard_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert!(!is_complete(d));
        let index = r#"{"weight_map":{"a":"s1.safetensors","b":"s2.safetensors","c":"s1.safetensors"}}"#;
        std::fs::write(d.join(INDEX), index).unwrap();
        assert_eq!(shards(&d.join(INDEX)).unwrap(), ["s1.safetensors", "s2.safetensors"]);
        std::fs::write(d.join("s1.safetensors"), "").unwrap();
        assert!(!is_complete(d));
        std::fs::write(d.join("s2.safetensors"), "").unwrap();
        assert!(is_complete(d));
    }
}
