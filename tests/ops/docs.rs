//! The repository carries its own design: no file points outside it (the
//! architecture and API contract used to live in a file beside the checkout),
//! and every relative link of the Markdown docs names a file of the repository.

use std::path::{Path, PathBuf};

use crate::promql;

/// The repository's text files: what a reader or a build follows.
fn text_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "node_modules") {
                text_files(&path, found);
            }
        } else if [
            ".md", ".rs", ".toml", ".sh", ".yml", ".yaml", ".sql", ".conf", ".py",
        ]
        .iter()
        .any(|ext| name.ends_with(ext))
            || matches!(name.as_str(), "Makefile" | "Dockerfile" | "run" | "fuzz")
        {
            found.push(path);
        }
    }
}

#[test]
fn nothing_in_the_repository_points_outside_it() {
    let repo = promql::repo().canonicalize().unwrap();
    let mut files = Vec::new();
    text_files(&repo, &mut files);
    assert!(files.len() > 50, "{} files", files.len());
    let link = regex::Regex::new(r"\]\(([^)#\s]+)").unwrap();
    let mut outside = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&repo).unwrap().display();
        // Spelled in two pieces, so this file does not name them itself.
        for needle in [concat!("DESIGN", ".md"), concat!("shared", "/")] {
            if text.contains(needle) {
                outside.push(format!("{shown}: mentions {needle}"));
            }
        }
        if file.extension().is_some_and(|e| e == "md") {
            for target in link.captures_iter(&text).map(|c| c[1].to_owned()) {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let resolved = file.parent().unwrap().join(&target);
                match resolved.canonicalize() {
                    Ok(path) if path.starts_with(&repo) => {}
                    Ok(_) => outside.push(format!("{shown}: links {target}, outside")),
                    Err(_) => outside.push(format!("{shown}: links {target}, absent")),
                }
            }
        }
    }
    assert!(outside.is_empty(), "{outside:#?}");
}
