//! Saving and loading a global model as safetensors (readable by PyTorch, JAX, Hugging Face
//! tools): one tensor per variable under its libtorch name, plus the layer sizes (and, for
//! a CNN, the convolutions; for a TorchScript module, its file's SHA-256) and the spec hash
//! in the metadata. [`load_params_for`] reads the parameters of a given spec from any
//! safetensors file (a warm start), checking names and shapes.
//!
//! A TorchScript model's file does not hold the module: it loads as a spec without a
//! module path (the tensors' names and shapes give its layout, the metadata its file's
//! SHA-256), and the spec hash is recomputed from those and checked against the recorded
//! one; inference pairs it with the module file (`crate::predict::ModelFile::with_module`).

use dpfl_common::model::{Arch, ModelSpec};
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

/// Why a safetensors file cannot start a model (every variant names the file).
#[derive(Debug, thiserror::Error)]
pub enum WarmStartError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a safetensors file.
    #[error("{path}: not a safetensors file: {reason}")]
    Format {
        /// File.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// A tensor the model needs is absent.
    #[error(
        "{path}: has no tensor `{name}`, which the model {spec} needs (the file has: {found})"
    )]
    Missing {
        /// File.
        path: String,
        /// Missing tensor.
        name: String,
        /// The model.
        spec: String,
        /// Tensor names in the file.
        found: String,
    },
    /// A tensor has another shape than the model's.
    #[error("{path}: tensor `{name}` has shape {got:?}, the model {spec} needs {expected:?}")]
    Shape {
        /// File.
        path: String,
        /// Tensor.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        got: Vec<usize>,
        /// The model.
        spec: String,
    },
    /// A tensor is not 32-bit float.
    #[error("{path}: tensor `{name}` is {dtype}, expected F32")]
    Dtype {
        /// File.
        path: String,
        /// Tensor.
        name: String,
        /// Its type.
        dtype: String,
    },
    /// A tensor the model does not have (a file for another model).
    #[error("{path}: tensor `{name}` is not part of the model {spec}")]
    Unexpected {
        /// File.
        path: String,
        /// Tensor.
        name: String,
        /// The model.
        spec: String,
    },
    /// NaN or infinity in a tensor.
    #[error("{path}: tensor `{name}` holds a NaN or an infinity")]
    NonFinite {
        /// File.
        path: String,
        /// Tensor.
        name: String,
    },
}

/// The parameters of `spec` (wire order) from a safetensors file: every tensor of the
/// spec's layout must be present under its name (`fc0.weight`, ...) as F32 with the
/// layout's shape, finite, and the file may hold nothing else. Metadata is ignored, so a
/// file PyTorch wrote (`safetensors.torch.save_file(model.state_dict(), ...)` with the
/// same names) works as well as one of ours.
pub fn load_params_for(spec: &ModelSpec, path: &Path) -> Result<Vec<f32>, WarmStartError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| WarmStartError::Io {
        path: p.clone(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| WarmStartError::Format {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    let layout = spec.layout();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    if let Some(extra) = names.iter().find(|n| !layout.iter().any(|s| &s.name == *n)) {
        return Err(WarmStartError::Unexpected {
            path: p,
            name: extra.clone(),
            spec: spec.to_string(),
        });
    }
    let mut params = vec![0f32; spec.num_params()];
    for slot in &layout {
        let t = st.tensor(&slot.name).map_err(|_| WarmStartError::Missing {
            path: p.clone(),
            name: slot.name.clone(),
            spec: spec.to_string(),
            found: names.join(", "),
        })?;
        if t.dtype() != Dtype::F32 {
            return Err(WarmStartError::Dtype {
                path: p,
                name: slot.name.clone(),
                dtype: format!("{:?}", t.dtype()),
            });
        }
        if t.shape() != slot.shape.as_slice() {
            return Err(WarmStartError::Shape {
                path: p,
                name: slot.name.clone(),
                expected: slot.shape.clone(),
                got: t.shape().to_vec(),
                spec: spec.to_string(),
            });
        }
        let vals = dpfl_common::wire::f32_from_le_bytes(t.data());
        if vals.iter().any(|v| !v.is_finite()) {
            return Err(WarmStartError::NonFinite {
                path: p,
                name: slot.name.clone(),
            });
        }
        params[slot.offset..slot.offset + slot.len].copy_from_slice(&vals);
    }
    Ok(params)
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 32 bytes of a 64-digit hex string.
fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The `arch` metadata entry: `mlp`, `cnn:C,H,W:CH1,CH2,...:KERNEL` or
/// `torchscript:SHA256`.
fn arch_to_meta(arch: &Arch) -> String {
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    match arch {
        Arch::Mlp => "mlp".into(),
        Arch::Cnn {
            input,
            channels,
            kernel,
        } => format!("cnn:{}:{}:{kernel}", join(input), join(channels)),
        Arch::TorchScript { sha256, .. } => format!("torchscript:{}", hex(sha256)),
    }
}

/// The architecture of an `arch` entry. A TorchScript module's parameter list comes from
/// the file's tensors (`tensors`: names and shapes), not from the metadata.
fn arch_from_meta(
    s: &str,
    tensors: impl FnOnce() -> Vec<(String, Vec<usize>)>,
) -> Result<Arch, ExportError> {
    let bad = || ExportError::Format(format!("`arch` metadata {s:?} not understood"));
    let list = |v: &str| {
        v.split(',')
            .map(|x| x.parse::<usize>().map_err(|_| bad()))
            .collect::<Result<Vec<_>, _>>()
    };
    if s == "mlp" {
        return Ok(Arch::Mlp);
    }
    let parts: Vec<&str> = s.split(':').collect();
    match parts.as_slice() {
        ["torchscript", sha] => {
            let sha256 = unhex32(sha).ok_or_else(bad)?;
            let mut params = tensors();
            params.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Arch::TorchScript {
                sha256,
                params,
                path: None,
            })
        }
        ["cnn", input, channels, kernel] => {
            let input: [usize; 3] = list(input)?.try_into().map_err(|_| bad())?;
            Ok(Arch::Cnn {
                input,
                channels: list(channels)?,
                kernel: kernel.parse().map_err(|_| bad())?,
            })
        }
        _ => Err(bad()),
    }
}

/// Writes `params` (wire order) as a safetensors file, atomically (temp file + rename).
pub fn save_safetensors(spec: &ModelSpec, params: &[f32], path: &Path) -> Result<(), ExportError> {
    save_safetensors_with_metadata(spec, params, path, &HashMap::new())
}

/// As [`save_safetensors`], with more metadata entries (the standardisation, class and
/// feature names: `crate::predict::ModelFile`). `layers`, `format` and `arch` cannot be
/// overridden.
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
    let format = match spec.arch {
        Arch::Mlp => "dpfl-mlp-relu-v1",
        Arch::Cnn { .. } => "dpfl-cnn-relu-maxpool2-v1",
        Arch::TorchScript { .. } => "dpfl-torchscript-v1",
    };
    meta.insert("format".to_string(), format.to_string());
    if !spec.is_mlp() {
        meta.insert("arch".to_string(), arch_to_meta(&spec.arch));
    }
    meta.insert(SPEC_HASH_KEY.to_string(), hex(&spec.hash()));
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

/// Metadata entry of the spec hash (64 hex digits) the model was trained with.
pub const SPEC_HASH_KEY: &str = "spec_hash";

/// Reads a safetensors file written by [`save_safetensors`] back into (spec, params).
pub fn load_safetensors(path: &Path) -> Result<(ModelSpec, Vec<f32>), ExportError> {
    load_safetensors_with_metadata(path).map(|(s, p, _)| (s, p))
}

/// A model file's spec, parameters (wire order) and metadata entries.
pub type Loaded = (ModelSpec, Vec<f32>, HashMap<String, String>);

/// As [`load_safetensors`], with every metadata entry of the file. When the file records
/// a spec hash (files written since it is), the spec read back must have it.
pub fn load_safetensors_with_metadata(path: &Path) -> Result<Loaded, ExportError> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ExportError::Format(e.to_string()))?;
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
    // Files written before architectures existed have no `arch`: an MLP.
    let arch = match meta.get("arch") {
        Some(a) => arch_from_meta(a, || {
            st.tensors()
                .into_iter()
                .map(|(name, t)| (name, t.shape().to_vec()))
                .collect()
        })?,
        None => Arch::Mlp,
    };
    let spec = ModelSpec { layers, arch };
    spec.validate()
        .map_err(|e| ExportError::Format(e.to_string()))?;
    if let Some(recorded) = meta.get(SPEC_HASH_KEY) {
        let actual = hex(&spec.hash());
        if *recorded != actual {
            return Err(ExportError::Format(format!(
                "the file records spec hash {recorded}, its tensors and metadata give \
                 {actual} ({spec}): the file was altered"
            )));
        }
    }
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

    #[test]
    fn a_cnn_round_trips_with_its_architecture() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.safetensors");
        let spec = ModelSpec::cnn([1, 8, 8], vec![2, 3], 3, &[4], 5).unwrap();
        let params = dpfl_common::model::init_params(&spec, 2);
        save_safetensors(&spec, &params, &p).unwrap();
        let (s2, p2) = load_safetensors(&p).unwrap();
        assert_eq!(s2, spec);
        assert_eq!(p2, params);
        assert_eq!(load_params_for(&spec, &p).unwrap(), params);
        for bad in ["cnn:1,8:2:3", "cnn:1,8,8:2,x:3", "rnn", "cnn:1,8,8:2:3:4"] {
            assert!(arch_from_meta(bad, Vec::new).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_torchscript_models_file_gives_back_its_spec_and_checks_the_recorded_hash() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let script = |sha: u8| ModelSpec {
            layers: vec![3, 2],
            arch: Arch::TorchScript {
                sha256: [sha; 32],
                params: vec![
                    ("fc.bias".into(), vec![2]),
                    ("fc.weight".into(), vec![2, 3]),
                ],
                path: Some("m.pt".into()),
            },
        };
        let spec = script(7);
        spec.validate().unwrap();
        let params: Vec<f32> = (0..8).map(|i| i as f32).collect();
        save_safetensors(&spec, &params, &p).unwrap();
        let (back, got, meta) = load_safetensors_with_metadata(&p).unwrap();
        // The same spec (hash over the file's SHA-256, names and shapes), without a module.
        assert_eq!(back.hash(), spec.hash());
        assert!(matches!(&back.arch, Arch::TorchScript { path: None, .. }));
        assert_eq!(got, params);
        assert_eq!(meta[SPEC_HASH_KEY], hex(&spec.hash()));
        assert_eq!(meta["arch"], format!("torchscript:{}", "07".repeat(32)));

        // A file whose recorded hash its tensors and metadata do not give: another
        // module's SHA-256 written over the `arch` entry.
        let bytes: &[u8] = bytemuck_cast(&params);
        let views: Vec<(String, TensorView)> = spec
            .layout()
            .iter()
            .map(|s| {
                let d = &bytes[s.offset * 4..(s.offset + s.len) * 4];
                (
                    s.name.clone(),
                    TensorView::new(Dtype::F32, s.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        let meta: HashMap<String, String> = [
            ("layers", "3,2".to_string()),
            ("arch", arch_to_meta(&script(8).arch)),
            (SPEC_HASH_KEY, hex(&spec.hash())),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        std::fs::write(&p, safetensors::serialize(views, &Some(meta)).unwrap()).unwrap();
        let e = load_safetensors(&p).unwrap_err().to_string();
        assert!(
            e.contains(&hex(&spec.hash())) && e.contains(&hex(&script(8).hash())),
            "{e}"
        );
        let not_hex = format!("torchscript:{}", "g".repeat(64));
        for bad in ["torchscript:07", "torchscript:zz", not_hex.as_str()] {
            assert!(arch_from_meta(bad, Vec::new).is_err(), "{bad}");
        }
    }

    /// Writes named F32 (or F64) tensors with no metadata, as PyTorch's `save_file` would.
    fn write_raw(path: &Path, tensors: &[(&str, Vec<usize>, bool)]) {
        let data: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape, f64)| {
                let n: usize = shape.iter().product();
                vec![0u8; n * if *f64 { 8 } else { 4 }]
            })
            .collect();
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .zip(&data)
            .map(|((name, shape, f64), d)| {
                let dt = if *f64 { Dtype::F64 } else { Dtype::F32 };
                (
                    name.to_string(),
                    TensorView::new(dt, shape.clone(), d).unwrap(),
                )
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
    }

    #[test]
    fn a_warm_start_checks_every_name_shape_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let spec = ModelSpec::new(vec![3, 4, 2]).unwrap();
        let ok = [
            ("fc0.weight", vec![4, 3], false),
            ("fc0.bias", vec![4], false),
            ("fc1.weight", vec![2, 4], false),
            ("fc1.bias", vec![2], false),
        ];
        write_raw(&p, &ok);
        assert_eq!(load_params_for(&spec, &p).unwrap(), vec![0.0; 26]);
        // Our own files load too, whatever their metadata.
        let params: Vec<f32> = (0..26).map(|i| i as f32).collect();
        save_safetensors(&spec, &params, &p).unwrap();
        assert_eq!(load_params_for(&spec, &p).unwrap(), params);

        write_raw(&p, &ok[..3]);
        let e = load_params_for(&spec, &p).unwrap_err();
        assert!(
            matches!(&e, WarmStartError::Missing { name, .. } if name == "fc1.bias"),
            "{e}"
        );
        assert!(e.to_string().contains("w.safetensors"), "{e}");

        let mut shape = ok.to_vec();
        shape[1].1 = vec![5];
        write_raw(&p, &shape);
        let e = load_params_for(&spec, &p).unwrap_err();
        assert!(
            matches!(&e, WarmStartError::Shape { name, got, .. } if name == "fc0.bias" && got == &[5]),
            "{e}"
        );
        assert!(e.to_string().contains("mlp 3-4-2"), "{e}");

        let mut dtype = ok.to_vec();
        dtype[0].2 = true;
        write_raw(&p, &dtype);
        assert!(matches!(
            load_params_for(&spec, &p),
            Err(WarmStartError::Dtype { .. })
        ));

        let mut extra = ok.to_vec();
        extra.push(("fc2.weight", vec![1, 2], false));
        write_raw(&p, &extra);
        assert!(matches!(
            load_params_for(&spec, &p),
            Err(WarmStartError::Unexpected { name, .. }) if name == "fc2.weight"
        ));

        let mut nan = params.clone();
        nan[7] = f32::NAN;
        save_safetensors(&spec, &nan, &p).unwrap();
        assert!(matches!(
            load_params_for(&spec, &p),
            Err(WarmStartError::NonFinite { .. })
        ));

        std::fs::write(&p, b"not a model").unwrap();
        assert!(matches!(
            load_params_for(&spec, &p),
            Err(WarmStartError::Format { .. })
        ));
        assert!(matches!(
            load_params_for(&spec, &dir.path().join("absent")),
            Err(WarmStartError::Io { .. })
        ));
    }
}
