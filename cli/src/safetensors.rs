//! Writing a pulled model as a `.safetensors` file: an 8-byte header
//! length, a JSON header naming each tensor (PyTorch `nn.Sequential` state
//! dict names, PyTorch shapes, F32) and its byte range, then the data.
//! Loadable by `safetensors.torch.load_file` and by Burn's store.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use meridian_models::ParamLayout;

/// Writes `params` laid out by `layout` to `path`, with string metadata.
pub fn write(path: &Path, layout: &ParamLayout, params: &[f32], metadata: &BTreeMap<String, String>) -> Result<()> {
    if params.len() != layout.num_params() {
        bail!("model has {} values, its layout {}", params.len(), layout.num_params());
    }
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".to_string(), serde_json::to_value(metadata)?);
    let mut offset = 0usize;
    for t in layout.tensors() {
        let bytes = t.numel() * 4;
        header.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": "F32", "shape": t.shape, "data_offsets": [offset, offset + bytes] }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_string(&header)?.into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for v in params {
        out.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}
