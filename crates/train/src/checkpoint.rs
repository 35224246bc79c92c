//! Checkpoints (spec §8.2): one safetensors file per checkpoint holding every tensor under a
//! prefix (`model.<var>`, `optim.<entry>`, and caller-chosen groups such as `mixblock.` or
//! `model_k.`), plus a JSON metadata document (epoch, iteration, config text, RNG states,
//! metric history, versions) stored as a string under [`META_KEY`] in the safetensors header.
//!
//! Files are written atomically (`<path>.tmp` in the same directory, fsync, rename), so a crash
//! never leaves a truncated checkpoint under the final name. In a work directory, epoch
//! checkpoints are `epoch_{e}.safetensors`; only the newest `max_keep` are kept, and the text
//! file `latest` names the newest one (the counterpart of mmcv's `latest.pth` link).

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::error::{TrainError, TrainResult};

/// Key of the JSON metadata in the safetensors `__metadata__` map.
pub const META_KEY: &str = "mixbench";
/// Name of the pointer file that holds the file name of the newest epoch checkpoint.
pub const LATEST_POINTER: &str = "latest";

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

/// Saves `tensors` and the JSON `meta` as one safetensors file at `path`, atomically.
/// Duplicate tensor names are an error. Tensors may live on any device (copied to the host).
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
    let info = HashMap::from([(META_KEY.to_string(), meta_text)]);
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(host.iter().map(|(n, t)| (*n, t)), Some(info), tmp)
            .map_err(|e| TrainError::format(tmp, format!("cannot write safetensors: {e}")))
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
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
) -> TrainResult<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| TrainError::format(path, format!("not a safetensors file: {e}")))?;
    let meta_text = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| TrainError::key(path, META_KEY, "checkpoint has no metadata entry"))?;
    let meta = serde_json::from_str(meta_text)
        .map_err(|e| TrainError::key(path, META_KEY, format!("metadata is not valid JSON: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| TrainError::format(path, format!("cannot read tensors: {e}")))?;
    Ok((tensors, meta))
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

/// Epoch checkpoints present in `work_dir`, as `(epoch, path)` sorted by epoch.
pub fn list_epoch_checkpoints(work_dir: &Path) -> TrainResult<Vec<(usize, PathBuf)>> {
    let entries = std::fs::read_dir(work_dir).map_err(|e| TrainError::io(work_dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(work_dir, e))?;
        if let Some(epoch) = entry.file_name().to_str().and_then(parse_epoch_file_name) {
            found.push((epoch, entry.path()));
        }
    }
    found.sort();
    Ok(found)
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
    let pointer = work_dir.join(LATEST_POINTER);
    if pointer.is_file() {
        let text = std::fs::read_to_string(&pointer).map_err(|e| TrainError::io(&pointer, e))?;
        let name = text.trim();
        if name.is_empty() || name.contains(['/', '\\']) {
            return Err(TrainError::format(
                &pointer,
                format!("expected a checkpoint file name, got {name:?}"),
            ));
        }
        let target = work_dir.join(name);
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
        assert_eq!(loaded.len(), tensors.len());
        for (name, t) in &tensors {
            let l = &loaded[name];
            assert_eq!(l.dtype(), t.dtype(), "{name}");
            assert_eq!(l.dims(), t.dims(), "{name}");
            assert_eq!(bits(l), bits(t), "{name}");
        }
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
