//! TorchScript modules as federated models: a user's `torch.nn.Module`, saved with
//! `torch.jit.script(m).save("model.pt")`, becomes a [`ModelSpec`] whose hash covers the
//! file's SHA-256 and the module's parameter names and shapes; [`crate::Mlp`] trains it
//! through tch's `TrainableCModule`.
//!
//! Only parameters are federated (in wire order: sorted PyTorch names). Buffers (batch
//! norm statistics) stay as the file has them on every peer.

use dpfl_common::model::{Arch, ModelSpec};
use sha2::{Digest, Sha256};
use std::path::Path;

use crate::model::ModelError;

/// SHA-256 of a module file's bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The spec of the module at `path`, which maps `[batch, inputs]` rows to `[batch,
/// classes]` logits. Reads the file once (hash and parameters from the same bytes).
pub fn script_spec(path: &Path, inputs: usize, classes: usize) -> Result<ModelSpec, ModelError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ModelError::Unsupported(format!("{}: {e}", path.display())))?;
    let module = tch::CModule::load_data_on_device(&mut bytes.as_slice(), tch::Device::Cpu)
        .map_err(|e| {
            ModelError::Unsupported(format!(
                "{}: not a TorchScript module (torch.jit.script(m).save(path)): {e}",
                path.display()
            ))
        })?;
    let mut params: Vec<(String, Vec<usize>)> = module
        .named_parameters()?
        .into_iter()
        .map(|(name, t)| (name, t.size().iter().map(|d| *d as usize).collect()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let spec = ModelSpec {
        layers: vec![inputs, classes],
        arch: Arch::TorchScript {
            sha256: sha256(&bytes),
            params,
            path: Some(path.to_path_buf()),
        },
    };
    spec.validate()
        .map_err(|e| ModelError::Unsupported(format!("{}: {e}", path.display())))?;
    Ok(spec)
}

/// The module's own parameters (as saved in the file), in wire order: the first global
/// model of a TorchScript federation without a warm start.
pub fn module_params(spec: &ModelSpec) -> Result<Vec<f32>, ModelError> {
    crate::Mlp::new(spec, tch::Device::Cpu)?.to_flat()
}

/// Parses `torchscript:PATH:INPUTS:CLASSES` (the node's `--model` form of a module).
pub fn parse_arg(s: &str) -> Option<Result<ModelSpec, ModelError>> {
    let rest = s.strip_prefix("torchscript:")?;
    let mut it = rest.rsplitn(3, ':');
    let (classes, inputs, path) = (it.next()?, it.next()?, it.next()?);
    let bad =
        || ModelError::Unsupported(format!("{s:?}: expected torchscript:PATH:INPUTS:CLASSES"));
    let inputs = match inputs.parse::<usize>() {
        Ok(v) => v,
        Err(_) => return Some(Err(bad())),
    };
    let classes = match classes.parse::<usize>() {
        Ok(v) => v,
        Err(_) => return Some(Err(bad())),
    };
    Some(script_spec(Path::new(path), inputs, classes))
}
