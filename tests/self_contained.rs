//! A clone explains itself: the scripts and documents in the repository name no file on the
//! machine it was written on (a shared fixtures folder, a specification outside the tree).

mod common;
use common::root;
use std::path::Path;

/// Folders of the machine the project was developed on, never present in a clone.
const OUTSIDE: [&str; 2] = ["/work/", "/ref/"];

fn text_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text_files(&path, out);
        } else if std::fs::read_to_string(&path).is_ok() {
            out.push(path);
        }
    }
}

#[test]
fn scripts_and_documents_name_no_path_outside_the_repository() {
    let mut files = vec![root().join("README.md")];
    for dir in ["scripts", "docs", "configs"] {
        text_files(&root().join(dir), &mut files);
    }
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            if OUTSIDE.iter().any(|p| line.contains(p)) {
                found.push(format!("{}:{}: {line}", file.display(), n + 1));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
