//! The real model of the tests (SmolLM2-135M-Instruct, GGUF) is fetched and is what it says.

mod common;

#[test]
fn the_real_model_is_fetched_whole() {
    let gguf = common::smollm2::smollm2_gguf();
    let bytes = std::fs::read(&gguf).unwrap();
    assert_eq!(&bytes[..4], b"GGUF", "{}", gguf.display());
    assert_eq!(bytes.len(), 98_362_432);
}
