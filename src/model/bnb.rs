//! bitsandbytes' serialized 4-bit layout (docs/methods.md §5), as transformers' `save_pretrained`
//! writes a `load_in_4bit` model: `{p}.weight` (u8 codes), `{p}.weight.absmax`, `.quant_map`,
//! `.nested_absmax`, `.nested_quant_map` and `.quant_state.bitsandbytes__nf4` (JSON bytes).
//! Reading checks every part against the tensor's shape and the NF4 contract, so a corrupt or
//! mismatched checkpoint is an error naming the tensor instead of silently wrong weights.

use super::nf4::{dynamic_map, Absmax, NestedAbsmax, Nf4Tensor, BLOCK, NESTED_BLOCK, NF4};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// The key whose presence marks `{weight}` as stored by bitsandbytes in NF4.
pub fn quant_state_key(weight: &str) -> String {
    format!("{weight}.quant_state.bitsandbytes__nf4")
}

/// Reads the NF4 tensor stored under `weight` (e.g. `model.layers.0.mlp.up_proj.weight`);
/// `load(key)` gives a stored tensor or None; `shape` is what config.json implies.
pub fn read(
    weight: &str,
    shape: &[usize],
    load: &dyn Fn(&str) -> Result<Option<Tensor>>,
) -> Result<Nf4Tensor> {
    let part = |suffix: &str| -> Result<Tensor> {
        let key = format!("{weight}{suffix}");
        load(&key)?.with_context(|| {
            format!(
                "tensor {weight}: the 4-bit checkpoint lacks {key} (incomplete bitsandbytes state)"
            )
        })
    };
    let state_bytes: Vec<u8> = u8s(
        weight,
        ".quant_state",
        &part(".quant_state.bitsandbytes__nf4")?,
    )?;
    let state: serde_json::Value = serde_json::from_slice(&state_bytes).with_context(|| {
        format!(
            "tensor {weight}: quant_state.bitsandbytes__nf4 is not valid JSON (corrupt checkpoint)"
        )
    })?;
    let field = |k: &str| {
        state
            .get(k)
            .with_context(|| format!("tensor {weight}: quant_state has no \"{k}\""))
    };
    if field("quant_type")?.as_str() != Some("nf4") {
        bail!(
            "tensor {weight}: quant_type {} is not supported (only nf4)",
            field("quant_type")?
        );
    }
    if field("blocksize")?.as_u64() != Some(BLOCK as u64) {
        bail!(
            "tensor {weight}: blocksize {} is not supported (only {BLOCK})",
            field("blocksize")?
        );
    }
    let stored_shape: Vec<usize> = serde_json::from_value(field("shape")?.clone())
        .with_context(|| format!("tensor {weight}: quant_state shape is not a list of sizes"))?;
    if stored_shape != shape {
        bail!(
            "tensor {weight}: quant_state shape {stored_shape:?} but config.json implies {shape:?}"
        );
    }
    let n: usize = shape.iter().product();
    let blocks = n.div_ceil(BLOCK);
    let packed = u8s(weight, "", &part("")?)?;
    if packed.len() != n.div_ceil(2) {
        bail!(
            "tensor {weight}: {} bytes of 4-bit codes, {} expected for shape {shape:?} (corrupt checkpoint)",
            packed.len(),
            n.div_ceil(2)
        );
    }
    if f32s(weight, ".quant_map", &part(".quant_map")?)?
        .iter()
        .map(|v| v.to_bits())
        .ne(NF4.iter().map(|v| v.to_bits()))
    {
        bail!("tensor {weight}: quant_map is not the NF4 table");
    }
    let absmax = part(".absmax")?;
    let absmax = match state.get("nested_blocksize") {
        None => {
            let a = f32s(weight, ".absmax", &absmax)?;
            check_len(weight, ".absmax", a.len(), blocks)?;
            finite(weight, ".absmax", &a)?;
            Absmax::Plain(a)
        }
        Some(nb) => {
            if nb.as_u64() != Some(NESTED_BLOCK as u64) {
                bail!(
                    "tensor {weight}: nested_blocksize {nb} is not supported (only {NESTED_BLOCK})"
                );
            }
            let codes = u8s(weight, ".absmax", &absmax)?;
            check_len(weight, ".absmax", codes.len(), blocks)?;
            let scales = f32s(weight, ".nested_absmax", &part(".nested_absmax")?)?;
            check_len(
                weight,
                ".nested_absmax",
                scales.len(),
                blocks.div_ceil(NESTED_BLOCK),
            )?;
            finite(weight, ".nested_absmax", &scales)?;
            let map = f32s(weight, ".nested_quant_map", &part(".nested_quant_map")?)?;
            if map
                .iter()
                .map(|v| v.to_bits())
                .ne(dynamic_map().iter().map(|v| v.to_bits()))
            {
                bail!("tensor {weight}: nested_quant_map is not bitsandbytes' dynamic map");
            }
            let offset = field("nested_offset")?
                .as_f64()
                .with_context(|| format!("tensor {weight}: nested_offset is not a number"))?
                as f32;
            finite(weight, ".nested_offset", &[offset])?;
            Absmax::Double(NestedAbsmax {
                codes,
                scales,
                offset,
            })
        }
    };
    Ok(Nf4Tensor {
        shape: shape.to_vec(),
        packed,
        absmax,
    })
}

/// The tensors bitsandbytes stores for `q` under `weight`, ready for a safetensors file.
pub fn write(weight: &str, q: &Nf4Tensor) -> Result<Vec<(String, Tensor)>> {
    let dev = &Device::Cpu;
    let mut state = json!({
        "quant_type": "nf4",
        "blocksize": BLOCK,
        "dtype": "float32",
        "shape": q.shape,
    });
    let mut out = vec![
        (
            weight.to_string(),
            Tensor::from_vec(q.packed.clone(), (q.packed.len(), 1), dev)?,
        ),
        (
            format!("{weight}.quant_map"),
            Tensor::from_vec(NF4.to_vec(), 16, dev)?,
        ),
    ];
    match &q.absmax {
        Absmax::Plain(a) => out.push((
            format!("{weight}.absmax"),
            Tensor::from_vec(a.clone(), a.len(), dev)?,
        )),
        Absmax::Double(d) => {
            state["nested_blocksize"] = json!(NESTED_BLOCK);
            state["nested_dtype"] = json!("float32");
            state["nested_offset"] = json!(d.offset);
            out.push((
                format!("{weight}.absmax"),
                Tensor::from_vec(d.codes.clone(), d.codes.len(), dev)?,
            ));
            out.push((
                format!("{weight}.nested_absmax"),
                Tensor::from_vec(d.scales.clone(), d.scales.len(), dev)?,
            ));
            out.push((
                format!("{weight}.nested_quant_map"),
                Tensor::from_vec(dynamic_map().to_vec(), 256, dev)?,
            ));
        }
    }
    let bytes = serde_json::to_vec(&state)?;
    let len = bytes.len();
    out.push((quant_state_key(weight), Tensor::from_vec(bytes, len, dev)?));
    Ok(out)
}

/// transformers' `quantization_config` for a model written by [`write`].
pub fn quantization_config(double_quant: bool, compute_dtype: &str) -> serde_json::Value {
    json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
    })
}

fn u8s(weight: &str, part: &str, t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 {
        bail!(
            "tensor {weight}{part}: stored as {:?}, bitsandbytes writes u8",
            t.dtype()
        );
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn f32s(weight: &str, part: &str, t: &Tensor) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        bail!(
            "tensor {weight}{part}: stored as {:?}, bitsandbytes writes f32",
            t.dtype()
        );
    }
    Ok(t.flatten_all()?.to_vec1()?)
}

fn check_len(weight: &str, part: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        bail!("tensor {weight}{part}: {got} values, {want} expected for its shape (corrupt checkpoint)");
    }
    Ok(())
}

fn finite(weight: &str, part: &str, v: &[f32]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!(
            "tensor {weight}{part}: value {} at index {i} is not finite (corrupt checkpoint)",
            v[i]
        );
    }
    Ok(())
}
