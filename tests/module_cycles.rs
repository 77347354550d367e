//! The module graph of `src/` has no cycles: between top-level modules (`session` and `spool`,
//! ...) and between sibling submodules (`helo::policy` and `helo::trace`, ...).
//!
//! A cycle makes two modules one in all but name: neither can be read, tested or moved alone.
//! The layers of `src/lib.rs` only hold while every edge points one way, so this test keeps
//! them. It reads the sources as text: every `crate::`, `super::` and `self::` path outside
//! comments and `#[cfg(test)] mod tests` counts, in `use` items (braces expanded) and inline.
//! A module's use of its own submodules or of its parent's items is not an edge; test code may
//! reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A module path from the crate root, e.g. `["helo", "policy"]`.
type ModPath = Vec<String>;

/// Edges between children of one parent module, grouped by that parent.
type Graphs = BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn src_modules_have_no_import_cycles() {
    let mut cycles = Vec::new();
    for (parent, graph) in &src_graphs() {
        for cycle in find_cycles(graph) {
            let prefix = if parent.is_empty() {
                "crate".to_string()
            } else {
                format!("crate::{}", parent.join("::"))
            };
            cycles.push(format!(
                "{prefix}: {{{}}} import each other",
                cycle.join(", ")
            ));
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_parser_sees_grouped_and_relative_paths() {
    let from = vec!["helo".to_string(), "policy".to_string()];
    let text = "use crate::{dns::Lookup, helo::{trace::x, Check}};\nuse super::verdict::V;\n\
                // crate::spool::Envelope in a comment does not count\n\
                fn f() { crate::session::Session::new(); }\n";
    let got: BTreeSet<String> = referenced_paths(&without_tests(text), &from)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    for want in [
        "dns::Lookup",
        "helo::trace::x",
        "helo::Check",
        "helo::verdict::V",
        "session::Session::new",
    ] {
        assert!(got.contains(want), "{want} missing from {got:?}");
    }
    assert!(!got.iter().any(|p| p.starts_with("spool")), "{got:?}");

    let modules: BTreeSet<ModPath> = [vec!["helo"], vec!["helo", "policy"], vec!["helo", "trace"]]
        .into_iter()
        .map(|m| m.into_iter().map(String::from).collect())
        .collect();
    let to = |p: &str| p.split("::").map(String::from).collect::<ModPath>();
    assert_eq!(
        edge(&from, &to("helo::trace::x"), &modules),
        Some((vec!["helo".into()], "policy".into(), "trace".into()))
    );
    // An item of the parent module, not a sibling.
    assert_eq!(edge(&from, &to("helo::Check"), &modules), None);
}

/// The session is sans-I/O and takes its settings, not the configuration; the spool only
/// reads what the session hands it (`crate::message`).
#[test]
fn the_session_and_the_spool_stay_apart() {
    let graphs = src_graphs();
    let top = graphs.get(&Vec::new()).cloned().unwrap_or_default();
    for (from, to) in [
        ("session", "spool"),
        ("session", "config"),
        ("session", "server"),
        ("spool", "session"),
    ] {
        assert!(
            !top.get(from).is_some_and(|targets| targets.contains(to)),
            "{from} imports {to}"
        );
    }
}

fn src_graphs() -> Graphs {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = rust_files(&src);
    let modules: BTreeSet<ModPath> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut graphs = Graphs::new();
    for file in &files {
        let from = module_of(&src, file);
        let text = fs::read_to_string(file).expect("read a source file");
        for target in referenced_paths(&without_tests(&text), &from) {
            if let Some((parent, a, b)) = edge(&from, &target, &modules) {
                graphs
                    .entry(parent)
                    .or_default()
                    .entry(a)
                    .or_default()
                    .insert(b);
            }
        }
    }
    graphs
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("list src/").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_name().is_some_and(|n| n != "tests.rs")
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `src/helo/policy.rs` is `helo::policy`; `src/helo/mod.rs` is `helo`; `src/lib.rs` and
/// `src/main.rs` are the root.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).expect("file under src/");
    let mut parts: ModPath = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The text without `//` comments and without the `#[cfg(test)] mod tests` block (which
/// STYLE puts last in a file).
fn without_tests(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod tests"))
        {
            break;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every path that starts with `crate`, `super` or `self`, resolved from the crate root.
fn referenced_paths(text: &str, from: &ModPath) -> Vec<ModPath> {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let at_word_start = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        if at_word_start {
            for root in ["crate::", "super::", "self::"] {
                if bytes[i..].starts_with(root.as_bytes()) {
                    let (paths, end) = parse_tree(text, i);
                    for path in paths {
                        if let Some(resolved) = resolve(&path, from) {
                            out.push(resolved);
                        }
                    }
                    i = end;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// Parses a path, possibly with `{...}` groups, starting at `start`; returns the expanded
/// paths and where it stopped.
fn parse_tree(text: &str, start: usize) -> (Vec<Vec<String>>, usize) {
    let bytes = text.as_bytes();
    let mut prefix = Vec::new();
    let mut i = start;
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            let mut paths = Vec::new();
            i += 1;
            loop {
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    break;
                }
                let (inner, end) = parse_tree(text, i);
                for p in inner {
                    let mut full = prefix.clone();
                    full.extend(p);
                    paths.push(full);
                }
                i = end.max(i + 1);
            }
            return (paths, i + 1);
        }
        let word_start = i;
        while i < bytes.len() && (is_ident(bytes[i]) || bytes[i] == b'*') {
            i += 1;
        }
        if word_start == i {
            return (vec![prefix], i);
        }
        prefix.push(text[word_start..i].to_string());
        if bytes[i..].starts_with(b"::") {
            i += 2;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// Turns `crate::a::b`, `super::b` or `self::b` into a path from the root.
fn resolve(path: &[String], from: &ModPath) -> Option<ModPath> {
    let (first, rest) = path.split_first()?;
    let mut base = match first.as_str() {
        "crate" => Vec::new(),
        "self" => from.clone(),
        "super" => from[..from.len().checked_sub(1)?].to_vec(),
        _ => return None,
    };
    let mut rest = rest.iter().peekable();
    while rest.peek().is_some_and(|s| s.as_str() == "super") {
        base.pop();
        rest.next();
    }
    base.extend(rest.filter(|s| s.as_str() != "self").cloned());
    Some(base)
}

/// The edge `from` -> `target` adds between two children of their common parent, if both
/// sides are distinct modules below that parent.
fn edge(
    from: &ModPath,
    target: &ModPath,
    modules: &BTreeSet<ModPath>,
) -> Option<(ModPath, String, String)> {
    let common = from.iter().zip(target).take_while(|(a, b)| a == b).count();
    let a = from.get(common)?;
    let b = target.get(common)?;
    let mut child = target[..common].to_vec();
    child.push(b.clone());
    modules
        .contains(&child)
        .then(|| (from[..common].to_vec(), a.clone(), b.clone()))
}

/// The modules of each strongly connected component with more than one module (Tarjan):
/// every module of one reaches every other.
fn find_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        components: Vec<Vec<String>>,
    }
    impl<'g> Tarjan<'g> {
        fn visit(&mut self, v: &'g str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.components.push(component);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.components
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}
