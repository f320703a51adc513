//! `cargo xtask rooms`: no crate's rooms (the folders under `src/` and its top-level files) import
//! each other in a ring. Each file's `crate::`, `super::` and `self::` paths (brace groups expanded,
//! comments and test modules left out) are edges to the file they name; a name re-exported by a
//! front door (`lib.rs`, `main.rs`, a `mod.rs`) is followed to where it comes from, so importing
//! through the root hides nothing; edges into a front door on the way up, and from a front door
//! into its own room, are the room's own business. The rooms are then folded together and any
//! strongly connected set of more than one is a cycle, named with its files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::steps::root;

/// The crates whose rooms must point one way.
pub const CRATES: &[&str] = &[
    "engine-core",
    "engine-cli",
    "engine-py",
    "fake-llama-server",
    "nvsmi-shim",
    "xtask",
    "tests",
];

pub fn run() -> ExitCode {
    match check(CRATES) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(cycles) => {
            eprintln!("xtask: rooms import each other in a ring:\n{cycles}");
            ExitCode::FAILURE
        }
    }
}

/// Checks every crate; the cycles found, in words, as the error.
pub fn check(crates: &[&str]) -> Result<String, String> {
    let mut found = Vec::new();
    let mut rooms = 0;
    for krate in crates {
        let src = root().join(krate).join("src");
        let graph = Graph::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        let folded = graph.rooms();
        rooms += folded.len();
        for cycle in cycles(&folded) {
            found.push(format!("  {krate}: {}", cycle.join(" <-> ")));
        }
    }
    if found.is_empty() {
        Ok(format!(
            "no cycle among the {rooms} rooms of {} crates",
            crates.len()
        ))
    } else {
        Err(found.join("\n"))
    }
}

/// A module path inside a crate (`["engine", "pool"]`; the root is empty).
type Module = Vec<String>;

/// A crate's modules, their files, their edges and the names their front doors re-export.
struct Graph {
    files: BTreeMap<Module, PathBuf>,
    edges: BTreeMap<Module, BTreeSet<Module>>,
}

impl Graph {
    fn read(src: &Path) -> std::io::Result<Graph> {
        let mut files = BTreeMap::new();
        for file in rust_files(src)? {
            let relative = file
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut module: Module = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if module == ["lib"] || module == ["main"] || module.last().is_some_and(|m| m == "mod")
            {
                module.pop();
            }
            files.insert(module, file);
        }
        let texts: BTreeMap<Module, String> = files
            .iter()
            .map(|(m, f)| Ok((m.clone(), std::fs::read_to_string(f)?)))
            .collect::<std::io::Result<_>>()?;
        let mut reexports: BTreeMap<(Module, String), Module> = BTreeMap::new();
        for (module, text) in &texts {
            if !is_front_door(&files[module]) {
                continue;
            }
            for (base, path) in pub_uses(module, &strip_comments(text)) {
                if let Some((name, from)) = path.split_last() {
                    let mut target = base.clone();
                    target.extend(from.iter().cloned());
                    reexports.insert((module.clone(), name.clone()), target);
                }
            }
        }
        let graph = Graph {
            files,
            edges: BTreeMap::new(),
        };
        let mut edges = BTreeMap::new();
        for (module, text) in &texts {
            let front_door = is_front_door(&graph.files[module]);
            let code = strip_comments(before_tests(text));
            let mut targets = BTreeSet::new();
            for (base, path) in paths(module, front_door, &code) {
                let mut full = base;
                full.extend(path);
                let target = graph.resolve(&full, &reexports, 0);
                let up = target.len() <= module.len() && module[..target.len()] == target[..];
                let own_room = front_door && target.starts_with(module);
                if target != *module && !up && !own_room {
                    targets.insert(target);
                }
            }
            edges.insert(module.clone(), targets);
        }
        Ok(Graph { edges, ..graph })
    }

    /// The module a path names: the deepest one that is a file, through front doors' re-exports.
    fn resolve(
        &self,
        path: &[String],
        reexports: &BTreeMap<(Module, String), Module>,
        depth: u32,
    ) -> Module {
        let found = (0..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| self.files.contains_key(m))
            .unwrap_or_default();
        let rest = &path[found.len()..];
        if let Some(first) = rest.first()
            && depth < 8
            && let Some(origin) = reexports.get(&(found.clone(), first.clone()))
        {
            let mut next = origin.clone();
            next.extend(rest[1..].iter().cloned());
            return self.resolve(&next, reexports, depth + 1);
        }
        found
    }

    /// The edges between rooms (a module's first segment); the root is no room.
    fn rooms(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut rooms: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, targets) in &self.edges {
            let Some(room) = module.first() else { continue };
            let entry = rooms.entry(room.clone()).or_default();
            for target in targets {
                if let Some(other) = target.first()
                    && other != room
                {
                    entry.insert(other.clone());
                }
            }
        }
        rooms
    }
}

fn is_front_door(file: &Path) -> bool {
    matches!(
        file.file_name().and_then(|n| n.to_str()),
        Some("lib.rs" | "main.rs" | "mod.rs")
    )
}

fn rust_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    Ok(found)
}

/// The text before the first `#[cfg(test)]`: test modules import what they test from anywhere.
fn before_tests(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// The text without `//` comments (doc comments included: their links are no imports).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|line| line.find("//").map_or(line, |at| &line[..at]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::`/`super::`/`self::` path in `code`, with the module it starts from.
fn paths(module: &Module, front_door: bool, code: &str) -> Vec<(Module, Vec<String>)> {
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    let mut found = Vec::new();
    for (at, _) in code.match_indices("::") {
        let before = &code[..at];
        let word_start = before
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let base = match &before[word_start..] {
            "crate" => Vec::new(),
            "self" if front_door => module.clone(),
            "self" => module.clone(),
            "super" => parent.clone(),
            _ => continue,
        };
        for path in expand(&code[at + 2..]).0 {
            found.push((base.clone(), path));
        }
    }
    found
}

/// The `pub use` paths of a front door, each with the module it starts from.
fn pub_uses(module: &Module, code: &str) -> Vec<(Module, Vec<String>)> {
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    let mut found = Vec::new();
    for line_start in code.match_indices("pub").map(|(i, _)| i) {
        let rest = &code[line_start..];
        let Some(after) = rest
            .strip_prefix("pub use ")
            .or_else(|| rest.strip_prefix("pub(crate) use "))
        else {
            continue;
        };
        let (base, after) = if let Some(a) = after.strip_prefix("crate::") {
            (Vec::new(), a)
        } else if let Some(a) = after.strip_prefix("super::") {
            (parent.clone(), a)
        } else if let Some(a) = after.strip_prefix("self::") {
            (module.clone(), a)
        } else {
            (module.clone(), after)
        };
        for path in expand(after).0 {
            if path.len() >= 2 {
                found.push((base.clone(), path));
            }
        }
    }
    found
}

/// The paths of a use tree that starts `text` (`a::{b, c::d}`), and the bytes it took.
fn expand(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut current = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            let mut all = Vec::new();
            loop {
                let (inner, took) = expand(&text[i..]);
                all.extend(inner.into_iter().map(|p| {
                    let mut full = current.clone();
                    full.extend(p);
                    full
                }));
                i += took;
                skip_space(&mut i);
                match bytes.get(i) {
                    Some(b',') => i += 1,
                    Some(b'}') => return (all, i + 1),
                    _ => return (all, i),
                }
                skip_space(&mut i);
                if bytes.get(i) == Some(&b'}') {
                    return (all, i + 1);
                }
            }
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if start == i {
            return (vec![current], i);
        }
        current.push(text[start..i].to_string());
        if text[i..].starts_with("::") {
            i += 2;
            continue;
        }
        return (vec![current], i);
    }
}

/// The strongly connected sets of more than one room (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
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
                let mut set = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    set.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if set.len() > 1 {
                    set.sort();
                    self.found.push(set);
                }
            }
        }
    }
    let mut tarjan = Tarjan {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !tarjan.index.contains_key(v.as_str()) {
            tarjan.visit(v);
        }
    }
    tarjan.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, files: &[(&str, &str)]) {
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
    }

    #[test]
    fn a_ring_through_a_front_door_is_found_and_one_way_rooms_pass() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            &[
                ("lib.rs", "mod a;\nmod b;\npub use b::Thing;\n"),
                ("a/mod.rs", "mod inner;\n"),
                // `crate::Thing` is b's, through the root's re-export.
                (
                    "a/inner.rs",
                    "use crate::Thing;\n// use crate::c::Nothing;\n",
                ),
                ("b.rs", "pub struct Thing;\nuse crate::a::{inner, self};\n"),
            ],
        );
        let graph = Graph::read(dir.path()).unwrap();
        assert_eq!(
            cycles(&graph.rooms()),
            [vec!["a".to_string(), "b".to_string()]]
        );
        // One way only: no ring.
        write(
            dir.path(),
            &[(
                "b.rs",
                "pub struct Thing;\n#[cfg(test)]\nuse crate::a::inner;\n",
            )],
        );
        let graph = Graph::read(dir.path()).unwrap();
        assert!(cycles(&graph.rooms()).is_empty(), "{:?}", graph.rooms());
    }

    #[test]
    fn use_trees_expand_to_every_path() {
        let (paths, _) = expand("a::{b, c::{d, e}, f}::g;");
        let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
        assert_eq!(joined, ["a::b", "a::c::d", "a::c::e", "a::f"]);
    }
}
