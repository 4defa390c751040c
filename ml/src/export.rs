//! Saving and loading a global model as safetensors (readable by PyTorch, JAX, Hugging Face
//! tools): one tensor per variable under its libtorch name, plus the layer sizes in the
//! metadata.

use dpfl_common::model::ModelSpec;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// Errors saving or loading a model file.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// File system error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// safetensors refused the data.
    #[error("safetensors: {0}")]
    Format(String),
    /// Parameter vector and spec disagree.
    #[error("{got} parameters do not fit a model of {expected}")]
    Length {
        /// Expected.
        expected: usize,
        /// Given.
        got: usize,
    },
}

/// Writes `params` (wire order) as a safetensors file, atomically (temp file + rename).
pub fn save_safetensors(spec: &ModelSpec, params: &[f32], path: &Path) -> Result<(), ExportError> {
    save_safetensors_with_metadata(spec, params, path, &HashMap::new())
}

/// As [`save_safetensors`], with more metadata entries (the standardisation, class and
/// feature names: `crate::predict::ModelFile`). `layers` and `format` cannot be overridden.
pub fn save_safetensors_with_metadata(
    spec: &ModelSpec,
    params: &[f32],
    path: &Path,
    extra: &HashMap<String, String>,
) -> Result<(), ExportError> {
    if params.len() != spec.num_params() {
        return Err(ExportError::Length {
            expected: spec.num_params(),
            got: params.len(),
        });
    }
    let bytes: &[u8] = bytemuck_cast(params);
    let mut views = Vec::new();
    for slot in spec.layout() {
        let data = &bytes[slot.offset * 4..(slot.offset + slot.len) * 4];
        let view = TensorView::new(Dtype::F32, slot.shape.clone(), data)
            .map_err(|e| ExportError::Format(e.to_string()))?;
        views.push((slot.name.clone(), view));
    }
    let mut meta = extra.clone();
    meta.insert(
        "layers".to_string(),
        spec.layers
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(","),
    );
    meta.insert("format".to_string(), "dpfl-mlp-relu-v1".to_string());
    let out = safetensors::serialize(views, &Some(meta))
        .map_err(|e| ExportError::Format(e.to_string()))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a safetensors file written by [`save_safetensors`] back into (spec, params).
pub fn load_safetensors(path: &Path) -> Result<(ModelSpec, Vec<f32>), ExportError> {
    load_safetensors_with_metadata(path).map(|(s, p, _)| (s, p))
}

/// A model file's spec, parameters (wire order) and metadata entries.
pub type Loaded = (ModelSpec, Vec<f32>, HashMap<String, String>);

/// As [`load_safetensors`], with every metadata entry of the file.
pub fn load_safetensors_with_metadata(path: &Path) -> Result<Loaded, ExportError> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| ExportError::Format(e.to_string()))?;
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let layers = meta
        .get("layers")
        .ok_or_else(|| ExportError::Format("no `layers` metadata".into()))?
        .split(',')
        .map(|s| s.parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ExportError::Format(e.to_string()))?;
    let spec = ModelSpec::new(layers).map_err(|e| ExportError::Format(e.to_string()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ExportError::Format(e.to_string()))?;
    let mut params = vec![0f32; spec.num_params()];
    for slot in spec.layout() {
        let t = st
            .tensor(&slot.name)
            .map_err(|e| ExportError::Format(e.to_string()))?;
        if t.dtype() != Dtype::F32 || t.shape() != slot.shape.as_slice() {
            return Err(ExportError::Format(format!(
                "tensor {} has the wrong type or shape",
                slot.name
            )));
        }
        let vals = dpfl_common::wire::f32_from_le_bytes(t.data());
        params[slot.offset..slot.offset + slot.len].copy_from_slice(&vals);
    }
    Ok((spec, params, meta))
}

fn bytemuck_cast(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let spec = ModelSpec::new(vec![3, 4, 2]).unwrap();
        let params: Vec<f32> = (0..spec.num_params()).map(|i| i as f32 * 0.1).collect();
        save_safetensors(&spec, &params, &p).unwrap();
        let (s2, p2) = load_safetensors(&p).unwrap();
        assert_eq!(s2, spec);
        assert_eq!(p2, params);
        assert!(save_safetensors(&spec, &params[1..], &p).is_err());
    }
}
