//! The methods this tool implements: the one place that maps a kind name (`[adapter] kind`,
//! `prolora params --method`) or a PEFT type (`adapter_config.json`) to a method. Adding a
//! method is its file and one line here.

use super::method::{Method, PeftKeys, PeftRead};
use super::{lora, prolora, tied_lora, vera};
use anyhow::{bail, Result};
use serde::de::DeserializeOwned;

/// How to recognise and read one method.
pub struct Registration {
    /// `[adapter] kind`.
    pub kind: &'static str,
    /// `peft_type` in `adapter_config.json`.
    pub peft_type: &'static str,
    /// The options from the method's own `[adapter]` keys (the shared keys already removed).
    pub from_toml: fn(toml::Table) -> std::result::Result<Box<dyn Method>, toml::de::Error>,
    /// The options and shared keys from an `adapter_config.json`.
    pub from_peft: fn(&PeftKeys) -> Result<PeftRead>,
    /// The linears adapted when the user names none.
    pub default_targets: &'static [&'static str],
}

pub static METHODS: [&Registration; 4] = [
    &lora::REGISTRATION,
    &prolora::REGISTRATION,
    &vera::REGISTRATION,
    &tied_lora::REGISTRATION,
];

/// `from_toml` for options that deserialize with serde.
pub fn options_from_toml<T: Method + DeserializeOwned + 'static>(
    table: toml::Table,
) -> std::result::Result<Box<dyn Method>, toml::de::Error> {
    Ok(Box::new(table.try_into::<T>()?))
}

/// "lora, prolora, vera or tied-lora".
pub fn kind_names() -> String {
    let names: Vec<&str> = METHODS.iter().map(|m| m.kind).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// The method of kind name `kind`.
pub fn by_kind(kind: &str) -> Result<&'static Registration> {
    match METHODS.iter().find(|m| m.kind == kind) {
        Some(m) => Ok(m),
        None => bail!("unknown adapter method {kind:?} (choose {})", kind_names()),
    }
}

/// The method of PEFT type `peft_type`.
pub fn by_peft_type(peft_type: &str) -> Result<&'static Registration> {
    match METHODS.iter().find(|m| m.peft_type == peft_type) {
        Some(m) => Ok(m),
        None => {
            let types: Vec<String> = METHODS
                .iter()
                .map(|m| format!("{:?}", m.peft_type))
                .collect();
            bail!(
                "peft_type {peft_type:?} is not supported (supported: {})",
                types.join(", ")
            )
        }
    }
}
