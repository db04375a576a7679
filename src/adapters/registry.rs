//! The methods this tool implements: the one place that maps a kind name (`[adapter] kind`,
//! `prolora params --method`) or a PEFT type (`adapter_config.json`) to a method. Adding a
//! method is its file and one line here.

pub use super::method::Registration;
use super::{lora, prolora, tied_lora, vera};
use anyhow::{bail, Result};

pub static METHODS: [&Registration; 4] = [
    &lora::REGISTRATION,
    &prolora::REGISTRATION,
    &vera::REGISTRATION,
    &tied_lora::REGISTRATION,
];

/// "lora, prolora, vera or tied-lora".
pub fn kind_names() -> String {
    let names: Vec<&str> = METHODS.iter().map(|m| m.kind).collect();
    crate::choice::list(&names)
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
