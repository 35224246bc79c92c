//! Checkpoints (spec §8.2): one safetensors file per checkpoint holding every tensor under a
//! prefix (`model.<var>`, `optim.<entry>`, and caller-chosen groups such as `mixblock.` or
//! `model_k.`), plus a JSON metadata document (epoch, iteration, config text, RNG states,
//! metric history, versions) stored as a string under [`META_KEY`] in the safetensors header.
//!
//! Files are written atomically (`<path>.tmp` in the same directory, fsync, rename), so a crash
//! never leaves a truncated checkpoint under the final name; a crash can leave the `.tmp` file
//! itself, which [`clean_stale_temp_files`] removes. Checkpoints carry a SHA-256 checksum over
//! every tensor (name, dtype, shape, bytes) and the metadata text under [`CHECKSUM_KEY`];
//! [`load_checkpoint`] verifies it (files written before the checksum existed load unchecked)
//! and refuses a checkpoint holding a non-finite float. In a work directory, epoch
//! checkpoints are `epoch_{e}.safetensors`; only the newest `max_keep` are kept, and the text
//! file `latest` names the newest one (the counterpart of mmcv's `latest.pth` link).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use safetensors::View;
use sha2::{Digest, Sha256};

use crate::error::{TrainError, TrainResult};

/// Key of the JSON metadata in the safetensors `__metadata__` map.
pub const META_KEY: &str = "mixbench";
/// Key of the checksum in the safetensors `__metadata__` map: `sha256:<64 hex digits>`, see
/// `checkpoint_checksum`.
pub const CHECKSUM_KEY: &str = "mixbench.checksum";
/// Name of the pointer file that holds the file name of the newest epoch checkpoint.
pub const LATEST_POINTER: &str = "latest";

/// SHA-256 of a checkpoint's content, as stored under [`CHECKSUM_KEY`]: `sha256:<hex>`.
/// The same function hashes the host tensors when saving and the file's views when loading.
///
/// `tensors` yields `(name, dtype, shape, bytes)` in any order (they are hashed sorted by
/// name); `dtype` is the safetensors dtype name (`F32`, `I64`, …). Every tensor contributes
/// its name, dtype, shape and little-endian data, each field length-prefixed (u64 LE) so that
/// no two different contents hash the same input; the metadata JSON text (the value under
/// [`META_KEY`]) comes last.
fn checkpoint_checksum<'a>(
    tensors: impl IntoIterator<Item = (&'a str, String, Vec<usize>, &'a [u8])>,
    meta_text: &str,
) -> String {
    let mut list: Vec<_> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(&(list.len() as u64).to_le_bytes());
    for (name, dtype, shape, data) in &list {
        field(name.as_bytes());
        field(dtype.as_bytes());
        let dims: Vec<u8> = shape
            .iter()
            .flat_map(|&d| (d as u64).to_le_bytes())
            .collect();
        field(&dims);
        field(data);
    }
    field(meta_text.as_bytes());
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(7 + 2 * digest.len());
    hex.push_str("sha256:");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Writes a file atomically: `write` fills `<path>.tmp` (in the same directory), which is then
/// fsynced and renamed over `path`, and the directory is fsynced. On any failure the temporary
/// file is removed and an existing `path` is left untouched.
pub fn write_atomically<F>(path: &Path, write: F) -> TrainResult<()>
where
    F: FnOnce(&Path) -> TrainResult<()>,
{
    let mut tmp_name = path
        .file_name()
        .ok_or_else(|| TrainError::format(path, "not a file path"))?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = write(&tmp).and_then(|()| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| TrainError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
    });
    if let Err(err) = result {
        // The temporary file may not exist (the writer failed before creating it).
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Persists the rename; directories cannot be opened for fsync on every platform.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Saves `tensors` and the JSON `meta` as one safetensors file at `path`, atomically, with a
/// checksum under [`CHECKSUM_KEY`]. The file gets the permissions of a newly created file
/// (0644 under umask 022). Duplicate tensor names are an error. Tensors may live on any device
/// (copied to the host). Non-finite values are written as they are: check with
/// [`first_non_finite`] first to refuse them.
pub fn save_checkpoint(
    path: &Path,
    tensors: &[(String, Tensor)],
    meta: &serde_json::Value,
) -> TrainResult<()> {
    let mut names = BTreeSet::new();
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !names.insert(name.as_str()) {
            return Err(TrainError::key(
                path,
                name.clone(),
                "tensor name appears twice in the checkpoint",
            ));
        }
        host.push((name.as_str(), tensor.to_device(&Device::Cpu)?.contiguous()?));
    }
    let meta_text =
        serde_json::to_string(meta).map_err(|e| TrainError::format(path, e.to_string()))?;
    let data: Vec<_> = host.iter().map(|(_, t)| View::data(t)).collect();
    let checksum = checkpoint_checksum(
        host.iter().zip(&data).map(|((n, t), d)| {
            (
                *n,
                View::dtype(t).to_string(),
                View::shape(t).to_vec(),
                d.as_ref(),
            )
        }),
        &meta_text,
    );
    drop(data);
    let info = HashMap::from([
        (META_KEY.to_string(), meta_text),
        (CHECKSUM_KEY.to_string(), checksum),
    ]);
    // Serialized in memory and written through our own `<path>.tmp` (created with the
    // process's umask, so 0644 under umask 022): `serialize_to_file` would write through a
    // hidden `.tmpXXXXXX` file of mode 0600 that survives a kill.
    let bytes = safetensors::serialize(host.iter().map(|(n, t)| (*n, t)), Some(info))
        .map_err(|e| TrainError::format(path, format!("cannot serialize safetensors: {e}")))?;
    write_atomically(path, |tmp| {
        // A stale temporary file (e.g. a 0600 one from an older version) would keep its mode.
        match std::fs::remove_file(tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(TrainError::io(tmp, e))
            }
            _ => {}
        }
        let mut f = File::create(tmp).map_err(|e| TrainError::io(tmp, e))?;
        f.write_all(&bytes).map_err(|e| TrainError::io(tmp, e))
    })
}

/// [`save_checkpoint`] for a map of tensors (stored in sorted key order).
pub fn save_checkpoint_map(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: &serde_json::Value,
) -> TrainResult<()> {
    let mut list: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    save_checkpoint(path, &list, meta)
}

/// Loads a checkpoint written by [`save_checkpoint`]: its tensors (on `device`) and metadata.
///
/// Fails, with one line naming `path`, when the stored checksum ([`CHECKSUM_KEY`]) does not
/// match the content ("checksum mismatch: the file is corrupt"; files without a checksum,
/// written by older versions, are not checked), or when a float tensor holds a NaN or ±∞
/// (naming the tensor, see [`first_non_finite`]).
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
) -> TrainResult<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainError::format(path, format!("not a safetensors file: {e}")))?;
    let info = header.metadata().as_ref();
    let meta_text = info
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| TrainError::key(path, META_KEY, "checkpoint has no metadata entry"))?;
    if let Some(stored) = info.and_then(|m| m.get(CHECKSUM_KEY)) {
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| TrainError::format(path, format!("cannot read tensors: {e}")))?;
        let computed = checkpoint_checksum(
            st.iter()
                .map(|(n, v)| (n, v.dtype().to_string(), v.shape().to_vec(), v.data())),
            meta_text,
        );
        if &computed != stored {
            return Err(TrainError::format(
                path,
                "checksum mismatch: the file is corrupt",
            ));
        }
    }
    let meta = serde_json::from_str(meta_text)
        .map_err(|e| TrainError::key(path, META_KEY, format!("metadata is not valid JSON: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| TrainError::format(path, format!("cannot read tensors: {e}")))?;
    let mut sorted: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(name) = first_non_finite(&sorted)? {
        return Err(TrainError::key(
            path,
            name,
            "holds a non-finite value (NaN or infinity); refusing this checkpoint",
        ));
    }
    Ok((tensors, meta))
}

/// The JSON metadata of a checkpoint, read from its header alone (a few kilobytes, whatever
/// the file's size): what a command needs to know about the run (its stored config, its
/// epoch) before it loads the tensors. Not checksum-verified: [`load_checkpoint`] is.
pub fn read_checkpoint_meta(path: &Path) -> TrainResult<serde_json::Value> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| TrainError::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| TrainError::format(path, "not a safetensors file: too short"))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map_err(|e| TrainError::io(path, e))?.len();
    // safetensors caps headers at 100 MB; a larger length is a corrupt or foreign file.
    if len > 100_000_000 || len + 8 > size {
        return Err(TrainError::format(
            path,
            "not a safetensors file: bad header length",
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| TrainError::io(path, e))?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| TrainError::format(path, format!("not a safetensors file: {e}")))?;
    let text = header
        .get("__metadata__")
        .and_then(|m| m.get(META_KEY))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| TrainError::key(path, META_KEY, "checkpoint has no metadata entry"))?;
    serde_json::from_str(text)
        .map_err(|e| TrainError::key(path, META_KEY, format!("metadata is not valid JSON: {e}")))
}

/// The name of the first float tensor of `tensors` (in the given order) that holds a NaN or
/// ±∞, or `None` when every float tensor is finite. Integer and boolean tensors are skipped.
///
/// One reduction per float tensor on its own device (`Σ (x − x)`, which is 0 for finite
/// values and NaN otherwise) and one host transfer for the whole list, so a caller can run
/// it before writing a checkpoint and refuse to save a diverged state.
pub fn first_non_finite(tensors: &[(String, Tensor)]) -> candle_core::Result<Option<String>> {
    let floats: Vec<&(String, Tensor)> = tensors
        .iter()
        .filter(|(_, t)| t.dtype().is_float())
        .collect();
    let Some((_, first)) = floats.first() else {
        return Ok(None);
    };
    let device = first.device().clone();
    let sums = floats
        .iter()
        .map(|(_, t)| {
            // x − x: 0 for a finite x, NaN for NaN and ±∞.
            t.sub(t)?
                .sum_all()?
                .to_dtype(DType::F32)?
                .to_device(&device)?
                .reshape(1)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let sums = Tensor::cat(&sums, 0)?.to_vec1::<f32>()?;
    Ok(floats
        .iter()
        .zip(sums)
        .find(|(_, s)| !s.is_finite())
        .map(|((name, _), _)| name.clone()))
}

/// The variables of `varmap` as `(prefix + name, tensor)` pairs, sorted by name, for saving.
pub fn varmap_tensors(varmap: &VarMap, prefix: &str) -> Vec<(String, Tensor)> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut list: Vec<(String, Tensor)> = data
        .iter()
        .map(|(name, var)| (format!("{prefix}{name}"), var.as_tensor().detach()))
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list
}

/// The entries of `tensors` renamed to `prefix + name`, sorted by name, for saving (e.g. the
/// optimizer state under `optim.`).
pub fn with_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> Vec<(String, Tensor)> {
    let mut list: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list
}

/// The entries of `tensors` whose names start with `prefix`, with the prefix removed.
pub fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|name| (name.to_string(), v.clone()))
        })
        .collect()
}

/// Copies `tensors[prefix + name]` into every variable `name` of `varmap`, strictly: a
/// missing key, a key under `prefix` that names no variable, or a shape/dtype mismatch is an
/// error naming the key and `file`. Nothing is modified unless every check passes.
pub fn load_varmap(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    file: &Path,
) -> TrainResult<()> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut plan = Vec::with_capacity(names.len());
    for name in names {
        let key = format!("{prefix}{name}");
        let var = &data[name];
        let tensor = tensors
            .get(&key)
            .ok_or_else(|| TrainError::key(file, key.clone(), "missing from the checkpoint"))?;
        if tensor.dims() != var.dims() {
            return Err(TrainError::key(
                file,
                key,
                format!(
                    "checkpoint shape {:?} != model shape {:?}",
                    tensor.dims(),
                    var.dims()
                ),
            ));
        }
        if tensor.dtype() != var.dtype() {
            return Err(TrainError::key(
                file,
                key,
                format!(
                    "checkpoint dtype {:?} != model dtype {:?}",
                    tensor.dtype(),
                    var.dtype()
                ),
            ));
        }
        plan.push((var, tensor));
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| {
            k.strip_prefix(prefix)
                .is_some_and(|name| !data.contains_key(name))
        })
        .collect();
    unexpected.sort();
    if let Some(key) = unexpected.first() {
        return Err(TrainError::key(
            file,
            (*key).clone(),
            format!(
                "not a variable of the model ({} unexpected key(s) under `{prefix}`)",
                unexpected.len()
            ),
        ));
    }
    for (var, tensor) in plan {
        var.set(&tensor.to_device(var.device())?)?;
    }
    Ok(())
}

/// File name of the checkpoint of 1-based epoch `epoch`.
pub fn epoch_file_name(epoch: usize) -> String {
    format!("epoch_{epoch}.safetensors")
}

fn parse_epoch_file_name(name: &str) -> Option<usize> {
    name.strip_prefix("epoch_")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// When to write epoch checkpoints and how many to keep (reference: every 10 epochs and at the
/// last epoch, keep 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Save every `interval` epochs (and always at the last epoch).
    pub interval: usize,
    /// Keep only the newest `max_keep` epoch checkpoints; `None` keeps all.
    pub max_keep: Option<usize>,
}

impl CheckpointPolicy {
    /// Whether to save after 1-based epoch `epoch` of `max_epochs`.
    pub fn should_save(&self, epoch: usize, max_epochs: usize) -> bool {
        epoch == max_epochs || (self.interval > 0 && epoch.is_multiple_of(self.interval))
    }
}

/// Epoch checkpoint files (`epoch_{e}.safetensors`) present in `work_dir`, as
/// `(epoch, path)` sorted by ascending epoch; empty when `work_dir` does not exist.
///
/// When the checkpoint `latest` names is missing or fails to load, the entries below it are
/// the older kept checkpoints a user can resume from (`--resume-from`).
pub fn list_epoch_checkpoints(work_dir: &Path) -> TrainResult<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(work_dir, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(work_dir, e))?;
        if let Some(epoch) = entry.file_name().to_str().and_then(parse_epoch_file_name) {
            if entry.path().is_file() {
                found.push((epoch, entry.path()));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Whether `name` is a temporary file of a checkpoint write: `<file>.tmp` from
/// [`write_atomically`], or `.tmp` followed by six alphanumerics, the hidden file that
/// `safetensors::serialize_to_file` (used by older versions) writes through.
fn is_stale_temp_name(name: &str) -> bool {
    let hidden = name
        .strip_prefix(".tmp")
        .is_some_and(|rest| rest.len() == 6 && rest.bytes().all(|b| b.is_ascii_alphanumeric()));
    hidden || (name.len() > ".tmp".len() && name.ends_with(".tmp"))
}

/// Removes the temporary files an interrupted write can leave in `work_dir`: `*.tmp` (from
/// [`write_atomically`]) and hidden `.tmp??????` files (from older versions, which wrote
/// checkpoints with `safetensors::serialize_to_file`). Only regular files directly in
/// `work_dir` are considered. Returns the removed paths, sorted; empty when `work_dir` does
/// not exist.
///
/// Call it when a run starts or resumes, before anything writes into `work_dir`: a write in
/// progress also has a `.tmp` file.
pub fn clean_stale_temp_files(work_dir: &Path) -> TrainResult<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(TrainError::io(work_dir, e)),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(work_dir, e))?;
        let is_file = entry
            .file_type()
            .map_err(|e| TrainError::io(entry.path(), e))?
            .is_file();
        if is_file && entry.file_name().to_str().is_some_and(is_stale_temp_name) {
            stale.push(entry.path());
        }
    }
    stale.sort();
    for path in &stale {
        std::fs::remove_file(path).map_err(|e| TrainError::io(path, e))?;
    }
    Ok(stale)
}

/// The checkpoint path the `latest` pointer of `work_dir` names, whether or not that file
/// exists; `None` when there is no pointer. An empty pointer or one naming a path outside
/// `work_dir` is an error naming the pointer file.
///
/// [`find_latest_checkpoint`] silently falls back to the highest epoch when the named file is
/// missing; a caller that wants to report that (and list the older checkpoints with
/// [`list_epoch_checkpoints`]) compares the two.
pub fn read_latest_pointer(work_dir: &Path) -> TrainResult<Option<PathBuf>> {
    let pointer = work_dir.join(LATEST_POINTER);
    if !pointer.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
    let name = text.trim();
    if name.is_empty() || name.contains(['/', '\\']) {
        return Err(TrainError::format(
            &pointer,
            format!("expected a checkpoint file name, got {name:?}"),
        ));
    }
    Ok(Some(work_dir.join(name)))
}

/// Saves the checkpoint of 1-based `epoch` as `work_dir/epoch_{epoch}.safetensors`, points
/// `work_dir/latest` at it, then deletes the oldest epoch checkpoints beyond `max_keep`.
/// Returns the path written.
pub fn save_epoch_checkpoint(
    work_dir: &Path,
    epoch: usize,
    tensors: &[(String, Tensor)],
    meta: &serde_json::Value,
    max_keep: Option<usize>,
) -> TrainResult<PathBuf> {
    std::fs::create_dir_all(work_dir).map_err(|e| TrainError::io(work_dir, e))?;
    let name = epoch_file_name(epoch);
    let path = work_dir.join(&name);
    save_checkpoint(&path, tensors, meta)?;
    let pointer = work_dir.join(LATEST_POINTER);
    write_atomically(&pointer, |tmp| {
        let mut f = File::create(tmp).map_err(|e| TrainError::io(tmp, e))?;
        writeln!(f, "{name}").map_err(|e| TrainError::io(tmp, e))
    })?;
    if let Some(keep) = max_keep {
        let existing = list_epoch_checkpoints(work_dir)?;
        let excess = existing.len().saturating_sub(keep.max(1));
        for (old_epoch, old_path) in existing.into_iter().take(excess) {
            // Never delete what was just written, even if an older run left higher epochs.
            if old_epoch != epoch {
                std::fs::remove_file(&old_path).map_err(|e| TrainError::io(&old_path, e))?;
            }
        }
    }
    Ok(path)
}

/// The checkpoint to auto-resume from in `work_dir`: the file named by `latest` if it exists,
/// otherwise the highest-epoch `epoch_*.safetensors`; `None` if there is none (or no
/// `work_dir`).
pub fn find_latest_checkpoint(work_dir: &Path) -> TrainResult<Option<PathBuf>> {
    if !work_dir.is_dir() {
        return Ok(None);
    }
    if let Some(target) = read_latest_pointer(work_dir)? {
        if target.is_file() {
            return Ok(Some(target));
        }
    }
    Ok(list_epoch_checkpoints(work_dir)?
        .pop()
        .map(|(_, path)| path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use serde_json::json;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("train-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sample_tensors() -> Vec<(String, Tensor)> {
        let dev = Device::Cpu;
        vec![
            (
                "model.conv.weight".to_string(),
                Tensor::new(
                    &[[1.5f32, -0.0, f32::MIN_POSITIVE], [3.25, 1e-30, -7.0]],
                    &dev,
                )
                .unwrap(),
            ),
            ("optim.step".to_string(), Tensor::new(123i64, &dev).unwrap()),
            (
                "mixblock.v".to_string(),
                Tensor::new(&[0.1f64, 0.2], &dev).unwrap(),
            ),
        ]
    }

    fn bits(t: &Tensor) -> Vec<u8> {
        let t = t.flatten_all().unwrap();
        match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::F64 => t
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::I64 => t
                .to_vec1::<i64>()
                .unwrap()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            other => panic!("unexpected dtype {other:?}"),
        }
    }

    #[test]
    fn reading_the_metadata_of_a_foreign_or_short_file_is_an_error_naming_it() {
        let dir = temp_dir("meta-only");
        for (name, bytes) in [
            ("short", b"abc".to_vec()),
            (
                "huge-header",
                [u64::MAX.to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
            ),
            (
                "no-meta",
                [2u64.to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let e = read_checkpoint_meta(&p).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn round_trip_is_bit_exact_with_metadata() {
        let dir = temp_dir("roundtrip");
        let path = dir.join("a.safetensors");
        let meta = json!({"epoch": 3, "iter": 1500, "config": "{\n \"x\": 1\n}", "rng": {"data": [1, 2]},
                          "history": [[1, 10.5], [2, 20.25]], "versions": {"train": "0.1.0"}});
        let tensors = sample_tensors();
        save_checkpoint(&path, &tensors, &meta).unwrap();
        assert!(!dir.join("a.safetensors.tmp").exists());
        let (loaded, loaded_meta) = load_checkpoint(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded_meta, meta);
        assert_eq!(
            read_checkpoint_meta(&path).unwrap(),
            meta,
            "from the header alone"
        );
        assert_eq!(loaded.len(), tensors.len());
        for (name, t) in &tensors {
            let l = &loaded[name];
            assert_eq!(l.dtype(), t.dtype(), "{name}");
            assert_eq!(l.dims(), t.dims(), "{name}");
            assert_eq!(bits(l), bits(t), "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn checkpoints_get_the_umask_permissions_and_leave_no_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("mode");
        let path = dir.join("epoch_1.safetensors");
        // A stale 0600 temporary file from an older version does not pass its mode on.
        let stale = dir.join("epoch_1.safetensors.tmp");
        std::fs::write(&stale, b"old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o600)).unwrap();
        save_checkpoint(&path, &sample_tensors(), &json!({"epoch": 1})).unwrap();
        // A plain `File::create` gets 0666 & !umask (0644 under umask 022), not 0600.
        let reference = dir.join("reference");
        File::create(&reference).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
        assert_ne!(
            mode(&reference),
            0o600,
            "test needs a umask that is not 077"
        );
        std::fs::remove_file(&reference).unwrap();
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["epoch_1.safetensors"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Splits a safetensors file into its header JSON and its data bytes.
    fn split_header(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        (header, bytes[8 + n..].to_vec())
    }

    /// Writes a safetensors file from a header JSON and data bytes (header padded to 8).
    fn join_header(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
        let mut text = serde_json::to_string(header).unwrap().into_bytes();
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(data);
        out
    }

    #[test]
    fn a_corrupt_byte_or_an_edited_epoch_fails_the_checksum() {
        let dir = temp_dir("checksum");
        let path = dir.join("epoch_3.safetensors");
        save_checkpoint(&path, &sample_tensors(), &json!({"epoch": 3, "iter": 1500})).unwrap();
        let good = std::fs::read(&path).unwrap();
        let (header, data) = split_header(&good);
        let stored = header["__metadata__"][CHECKSUM_KEY].as_str().unwrap();
        assert!(
            stored.starts_with("sha256:") && stored.len() == 7 + 64,
            "{stored}"
        );
        load_checkpoint(&path, &Device::Cpu).unwrap();

        // One flipped bit in the tensor data (the last byte: part of a tensor, not padding).
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x01;
        std::fs::write(&path, &flipped).unwrap();
        let err = load_checkpoint(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("epoch_3.safetensors") && err.contains("checksum mismatch"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");

        // The metadata edited to another epoch, the header rewritten consistently.
        let mut edited = header.clone();
        let meta = edited["__metadata__"][META_KEY]
            .as_str()
            .unwrap()
            .to_string();
        let changed = meta.replace("\"epoch\":3", "\"epoch\":4");
        assert_ne!(meta, changed);
        edited["__metadata__"][META_KEY] = json!(changed);
        std::fs::write(&path, join_header(&edited, &data)).unwrap();
        // Still a well-formed safetensors file: only the checksum catches it.
        let bytes = std::fs::read(&path).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let err = load_checkpoint(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");

        // A renamed tensor is caught too.
        let mut renamed = header.clone();
        let obj = renamed.as_object_mut().unwrap();
        let info = obj.remove("mixblock.v").unwrap();
        obj.insert("mixblock.w".into(), info);
        std::fs::write(&path, join_header(&renamed, &data)).unwrap();
        let err = load_checkpoint(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum mismatch"), "{err}");

        // An older file without a checksum loads unchecked.
        let mut old = header.clone();
        old["__metadata__"]
            .as_object_mut()
            .unwrap()
            .remove(CHECKSUM_KEY);
        std::fs::write(&path, join_header(&old, &data)).unwrap();
        let (tensors, meta) = load_checkpoint(&path, &Device::Cpu).unwrap();
        assert_eq!(meta["epoch"], 3);
        assert_eq!(tensors.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn non_finite_tensors_are_found_and_refused_on_load() {
        let dev = Device::Cpu;
        let mut tensors = sample_tensors();
        assert_eq!(first_non_finite(&tensors).unwrap(), None);
        assert_eq!(first_non_finite(&[]).unwrap(), None);
        tensors.push((
            "optim.momentum.fc".to_string(),
            Tensor::new(&[1.0f64, f64::INFINITY], &dev).unwrap(),
        ));
        tensors.push((
            "model.nan".to_string(),
            Tensor::new(&[[0.0f32, f32::NAN]], &dev).unwrap(),
        ));
        tensors.push((
            "empty".to_string(),
            Tensor::zeros(0, DType::F32, &dev).unwrap(),
        ));
        assert_eq!(
            first_non_finite(&tensors).unwrap().as_deref(),
            Some("optim.momentum.fc")
        );
        assert_eq!(
            first_non_finite(&tensors[4..]).unwrap().as_deref(),
            Some("model.nan")
        );
        let half = Tensor::new(&[f32::NEG_INFINITY], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert_eq!(
            first_non_finite(&[("h".to_string(), half)])
                .unwrap()
                .as_deref(),
            Some("h")
        );
        // Integer tensors are never non-finite.
        let ints = vec![("i".to_string(), Tensor::new(&[i64::MAX], &dev).unwrap())];
        assert_eq!(first_non_finite(&ints).unwrap(), None);

        // Saving does not check (the caller decides); loading refuses, naming the tensor.
        let dir = temp_dir("nonfinite");
        let path = dir.join("epoch_2.safetensors");
        let bad = vec![
            sample_tensors()[0].clone(),
            (
                "model.fc.bias".to_string(),
                Tensor::new(&[f32::NAN], &dev).unwrap(),
            ),
        ];
        save_checkpoint(&path, &bad, &json!({"epoch": 2})).unwrap();
        let err = load_checkpoint(&path, &dev).unwrap_err().to_string();
        assert!(
            err.contains("epoch_2.safetensors")
                && err.contains("model.fc.bias")
                && err.contains("non-finite"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_temp_files_are_removed_and_nothing_else() {
        let dir = temp_dir("stale");
        assert!(clean_stale_temp_files(&dir.join("missing"))
            .unwrap()
            .is_empty());
        save_epoch_checkpoint(&dir, 1, &sample_tensors(), &json!({}), None).unwrap();
        for name in [
            "epoch_2.safetensors.tmp",
            "latest.tmp",
            ".tmpAb3xYz",
            ".tmp123456",
            // Not ours: kept.
            ".tmp",
            ".tmpshort",
            ".tmpWAYTOOLONG",
            "notes.txt",
            "result.json",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.join("dir.tmp")).unwrap();
        let removed = clean_stale_temp_files(&dir).unwrap();
        let removed: Vec<String> = removed
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            removed,
            vec![
                ".tmp123456",
                ".tmpAb3xYz",
                "epoch_2.safetensors.tmp",
                "latest.tmp"
            ]
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                ".tmp",
                ".tmpWAYTOOLONG",
                ".tmpshort",
                "dir.tmp",
                "epoch_1.safetensors",
                "latest",
                "notes.txt",
                "result.json"
            ]
        );
        assert!(clean_stale_temp_files(&dir).unwrap().is_empty());
        load_checkpoint(&dir.join("epoch_1.safetensors"), &Device::Cpu).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dangling_latest_pointer_is_visible_and_older_checkpoints_are_listed() {
        let dir = temp_dir("dangling");
        assert_eq!(
            list_epoch_checkpoints(&dir.join("missing")).unwrap(),
            vec![]
        );
        assert_eq!(read_latest_pointer(&dir).unwrap(), None);
        for epoch in [10, 20, 30] {
            save_epoch_checkpoint(
                &dir,
                epoch,
                &sample_tensors(),
                &json!({"epoch": epoch}),
                None,
            )
            .unwrap();
        }
        let newest = dir.join(epoch_file_name(30));
        assert_eq!(read_latest_pointer(&dir).unwrap(), Some(newest.clone()));
        std::fs::remove_file(&newest).unwrap();
        // The pointer still names the missing file; the older ones remain listed.
        assert_eq!(read_latest_pointer(&dir).unwrap(), Some(newest));
        assert_eq!(
            find_latest_checkpoint(&dir).unwrap(),
            Some(dir.join(epoch_file_name(20)))
        );
        let older: Vec<usize> = list_epoch_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(older, vec![10, 20]);
        std::fs::write(dir.join(LATEST_POINTER), "../x\n").unwrap();
        let err = read_latest_pointer(&dir).unwrap_err().to_string();
        assert!(err.contains("latest"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_writes_leave_the_old_file_and_no_partial_file() {
        let dir = temp_dir("atomic");
        let path = dir.join("ck.safetensors");
        save_checkpoint(&path, &sample_tensors(), &json!({"epoch": 1})).unwrap();
        let before = std::fs::read(&path).unwrap();

        // A writer that fails half-way through.
        let err = write_atomically(&path, |tmp| {
            std::fs::write(tmp, b"partial").unwrap();
            Err(TrainError::format(tmp, "simulated failure"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("simulated failure"));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.join("ck.safetensors.tmp").exists());

        // Duplicate names are rejected before anything is written.
        let mut dup = sample_tensors();
        dup.push(dup[0].clone());
        let err = save_checkpoint(&path, &dup, &json!({"epoch": 2}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.conv.weight") && err.contains("ck.safetensors"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // A successful write replaces the file.
        save_checkpoint(&path, &sample_tensors()[..1], &json!({"epoch": 2})).unwrap();
        let (t, meta) = load_checkpoint(&path, &Device::Cpu).unwrap();
        assert_eq!(meta["epoch"], 2);
        assert_eq!(t.len(), 1);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retention_keeps_the_newest_and_latest_points_at_it() {
        let dir = temp_dir("retention");
        assert_eq!(find_latest_checkpoint(&dir).unwrap(), None);
        let policy = CheckpointPolicy {
            interval: 10,
            max_keep: Some(1),
        };
        let max_epochs = 25;
        let tensors = sample_tensors();
        let mut saved = Vec::new();
        for epoch in 1..=max_epochs {
            if policy.should_save(epoch, max_epochs) {
                saved.push(epoch);
                save_epoch_checkpoint(
                    &dir,
                    epoch,
                    &tensors,
                    &json!({"epoch": epoch}),
                    policy.max_keep,
                )
                .unwrap();
                let latest = find_latest_checkpoint(&dir).unwrap().unwrap();
                assert_eq!(latest, dir.join(epoch_file_name(epoch)));
            }
        }
        assert_eq!(saved, vec![10, 20, 25]);
        let left: Vec<usize> = list_epoch_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(left, vec![25]);
        assert_eq!(
            std::fs::read_to_string(dir.join(LATEST_POINTER))
                .unwrap()
                .trim(),
            "epoch_25.safetensors"
        );

        // Keep two; and without a pointer, the highest epoch wins.
        save_epoch_checkpoint(&dir, 30, &tensors, &json!({}), Some(2)).unwrap();
        save_epoch_checkpoint(&dir, 40, &tensors, &json!({}), Some(2)).unwrap();
        let left: Vec<usize> = list_epoch_checkpoints(&dir)
            .unwrap()
            .into_iter()
            .map(|(e, _)| e)
            .collect();
        assert_eq!(left, vec![30, 40]);
        std::fs::remove_file(dir.join(LATEST_POINTER)).unwrap();
        assert_eq!(
            find_latest_checkpoint(&dir).unwrap(),
            Some(dir.join("epoch_40.safetensors"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strict_varmap_loading_names_the_offending_key() {
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        varmap
            .get(
                (2, 3),
                "fc.weight",
                candle_nn::Init::Const(0.0),
                DType::F32,
                &dev,
            )
            .unwrap();
        varmap
            .get(3, "fc.bias", candle_nn::Init::Const(0.0), DType::F32, &dev)
            .unwrap();
        let source = VarMap::new();
        source
            .get(
                (2, 3),
                "fc.weight",
                candle_nn::Init::Const(1.5),
                DType::F32,
                &dev,
            )
            .unwrap();
        source
            .get(3, "fc.bias", candle_nn::Init::Const(-2.0), DType::F32, &dev)
            .unwrap();
        let good: HashMap<String, Tensor> = varmap_tensors(&source, "model.").into_iter().collect();
        let file = Path::new("run/epoch_10.safetensors");

        let mut missing = good.clone();
        missing.remove("model.fc.bias");
        let err = load_varmap(&varmap, &missing, "model.", file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.fc.bias") && err.contains("missing") && err.contains("epoch_10"),
            "{err}"
        );

        let mut extra = good.clone();
        extra.insert(
            "model.fc2.weight".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        extra.insert(
            "optim.step".into(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        let err = load_varmap(&varmap, &extra, "model.", file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.fc2.weight") && err.contains("unexpected"),
            "{err}"
        );

        let mut wrong = good.clone();
        wrong.insert(
            "model.fc.weight".into(),
            Tensor::zeros((3, 2), DType::F32, &dev).unwrap(),
        );
        let err = load_varmap(&varmap, &wrong, "model.", file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.fc.weight") && err.contains("shape"),
            "{err}"
        );
        // Nothing was copied by the failed attempts.
        let zeros: Vec<f32> = varmap.data().lock().unwrap()["fc.bias"]
            .as_tensor()
            .to_vec1()
            .unwrap();
        assert_eq!(zeros, vec![0.0; 3]);

        // Keys outside the prefix are ignored; a full match copies every variable.
        load_varmap(
            &varmap,
            &extra
                .into_iter()
                .filter(|(k, _)| k != "model.fc2.weight")
                .collect(),
            "model.",
            file,
        )
        .unwrap();
        let bias: Vec<f32> = varmap.data().lock().unwrap()["fc.bias"]
            .as_tensor()
            .to_vec1()
            .unwrap();
        assert_eq!(bias, vec![-2.0; 3]);
        let stripped = strip_prefix(&good, "model.");
        assert_eq!(stripped.len(), 2);
        let names: Vec<String> = with_prefix(&stripped, "model_k.")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(names, vec!["model_k.fc.bias", "model_k.fc.weight"]);
    }
}
