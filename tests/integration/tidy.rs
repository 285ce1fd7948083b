//! The architecture's invariants that a machine can check, over the source files: each test
//! names the rule of ARCHITECTURE.md ("Invariants checked by the tidy test") it keeps, and
//! fails naming the file and line that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a source file may be, in lines.
const FILE_LINES_MAX: usize = 800;

/// The workspace's root directory.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is inside the workspace")
        .to_path_buf()
}

/// A source file: its path from the root, and its lines.
struct Source {
    path: String,
    lines: Vec<String>,
}

impl Source {
    /// Lines (numbered from 1) that contain `needle` outside a comment.
    fn code_lines_with<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.lines
            .iter()
            .enumerate()
            .filter_map(move |(index, line)| {
                let code = line.split("//").next().unwrap_or("");
                code.contains(needle).then_some(index + 1)
            })
    }

    /// Whether the file holds only tests: a test module of its own, by its name.
    fn is_test_module(&self) -> bool {
        let name = self.path.rsplit('/').next().unwrap_or("");
        matches!(
            name,
            "tests.rs" | "races.rs" | "model.rs" | "conformance.rs"
        ) && self.path.starts_with("server/src/")
    }

    /// The first line of the file's inline `mod tests`, if it has one (by convention the
    /// module closes the file).
    fn tests_start(&self) -> Option<usize> {
        self.lines
            .windows(2)
            .position(|pair| pair[0].trim() == "#[cfg(test)]" && pair[1].starts_with("mod tests"))
    }
}

/// Every `.rs` file under `directories` (relative to the root), in path order.
fn sources(directories: &[&str]) -> Vec<Source> {
    let root = root();
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = directories.iter().map(|dir| root.join(dir)).collect();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).expect("read a source directory") {
                pending.push(entry.expect("a directory entry").path());
            }
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            let text = std::fs::read_to_string(&path).expect("read a source file");
            found.push(Source {
                path: path
                    .strip_prefix(&root)
                    .expect("under the root")
                    .to_string_lossy()
                    .replace('\\', "/"),
                lines: text.lines().map(str::to_string).collect(),
            });
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Fails with every breach of `rule`, one per line.
fn assert_none(rule: &str, breaches: Vec<String>) {
    assert!(breaches.is_empty(), "{rule}:\n  {}", breaches.join("\n  "));
}

#[test]
fn rocksdb_is_named_only_in_the_rocksdb_module() {
    let mut breaches = Vec::new();
    for source in sources(&[
        "src",
        "server/src",
        "server/benches",
        "client/src",
        "tests/integration",
    ]) {
        if source.path.starts_with("server/src/storage/rocks/") {
            continue;
        }
        // Spelled in two halves, so that this file does not name what it looks for.
        for needle in [["rocks", "db::"].concat(), ["use rocks", "db"].concat()] {
            for line in source.code_lines_with(&needle) {
                breaches.push(format!("{}:{line}", source.path));
            }
        }
    }
    assert_none(
        "`rocksdb` named outside server/src/storage/rocks/",
        breaches,
    );
}

#[test]
fn the_redis_client_is_named_only_in_the_redis_module() {
    let mut breaches = Vec::new();
    // The tests talk to their cluster directly; the server only through its store.
    for source in sources(&["src", "server/src", "server/benches", "client/src"]) {
        if source.path.starts_with("server/src/storage/redis/") {
            continue;
        }
        // Spelled in two halves, so that this file does not name what it looks for; the
        // crate's paths, not the module's (`self::redis::`, `storage::redis::`).
        for needle in [" ", "(", "<", "&", "use "]
            .map(|before| [before, "red", "is::"].concat())
            .into_iter()
            .chain([["use red", "is;"].concat()])
        {
            for line in source.code_lines_with(&needle) {
                breaches.push(format!("{}:{line}", source.path));
            }
        }
    }
    breaches.dedup();
    assert_none(
        "the Redis client named outside server/src/storage/redis/",
        breaches,
    );
}

#[test]
fn statuses_are_built_only_in_the_service_layer() {
    const BUILDERS: [&str; 19] = [
        "new",
        "ok",
        "cancelled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
        "from_error",
    ];
    let mut breaches = Vec::new();
    for source in sources(&["server/src"]) {
        if source.path == "server/src/service.rs" || source.path.starts_with("server/src/service/")
        {
            continue;
        }
        for builder in BUILDERS {
            for line in source.code_lines_with(&format!("Status::{builder}(")) {
                // `PurgeStatus::new(` and the like are not gRPC statuses.
                let text = &source.lines[line - 1];
                let at = text
                    .find(&format!("Status::{builder}("))
                    .expect("found above");
                let qualified =
                    text[..at].ends_with("tonic::") || !text[..at].ends_with(char::is_alphanumeric);
                if qualified {
                    breaches.push(format!("{}:{line}", source.path));
                }
            }
        }
    }
    assert_none(
        "a tonic::Status built outside server/src/service.rs and service/",
        breaches,
    );
}

#[test]
fn the_clock_is_read_only_in_clock_rs() {
    let mut breaches = Vec::new();
    for source in sources(&["server/src"]) {
        if source.path == "server/src/clock.rs" {
            continue;
        }
        for needle in ["SystemTime::now", "Instant::now"] {
            for line in source.code_lines_with(needle) {
                breaches.push(format!("{}:{line}", source.path));
            }
        }
    }
    assert_none("a clock read outside server/src/clock.rs", breaches);
}

#[test]
fn no_test_sleeps() {
    let mut breaches = Vec::new();
    for source in sources(&["tests/integration", "server/src", "client/src"])
        .into_iter()
        .chain(
            sources(&["tests"])
                .into_iter()
                .filter(|source| source.path == "tests/harness.rs"),
        )
    {
        let first_test_line = if source.path.starts_with("tests/") || source.is_test_module() {
            1
        } else {
            match source.tests_start() {
                Some(index) => index + 1,
                None => continue,
            }
        };
        let needles = [
            ["::sl", "eep("].concat(),
            ["time::sl", "eep;"].concat(),
            ["thread::sl", "eep;"].concat(),
        ];
        let mut sleeps: Vec<usize> = needles
            .iter()
            .flat_map(|needle| source.code_lines_with(needle).collect::<Vec<_>>())
            .filter(|&line| line >= first_test_line)
            .collect();
        if source.path == "tests/harness.rs" {
            // The one allowed: `pause`, a stress test's deliberate delay between actions.
            let pause = source
                .lines
                .iter()
                .position(|line| line.starts_with("pub async fn pause("))
                .expect("the harness has `pause`");
            sleeps.retain(|&line| line != pause + 2);
        }
        for line in sleeps {
            breaches.push(format!("{}:{line}", source.path));
        }
    }
    assert_none(
        "a test sleeps (wait for the effect with `poll_every` and a deadline instead)",
        breaches,
    );
}

#[test]
fn no_source_file_is_longer_than_800_lines() {
    let breaches: Vec<String> = sources(&["src", "server", "client/src", "tests"])
        .into_iter()
        .filter(|source| source.lines.len() > FILE_LINES_MAX)
        .map(|source| format!("{}: {} lines", source.path, source.lines.len()))
        .collect();
    assert_none("a source file longer than 800 lines", breaches);
}

#[test]
fn the_servers_modules_depend_on_each_other_without_cycles() {
    // crate-level module → the crate-level modules it names.
    let mut depends: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut upward = Vec::new();
    for source in sources(&["server/src"]) {
        let relative = source.path.trim_start_matches("server/src/");
        let module = relative
            .split(['/', '.'])
            .next()
            .expect("a path has a first component")
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let names = depends.entry(module.clone()).or_default();
        for (index, line) in source.lines.iter().enumerate() {
            let mut rest = line.as_str();
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name.starts_with(char::is_uppercase) {
                    upward.push(format!("{}:{} names crate::{name}", source.path, index + 1));
                } else if !name.is_empty() && name != module {
                    names.insert(name);
                }
            }
        }
    }
    assert_none("a module reaches up into lib.rs", upward);
    // Depth-first search for a cycle.
    fn visit<'a>(
        module: &'a str,
        depends: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(start) = path.iter().position(|&on_path| on_path == module) {
            let mut cycle = path[start..].to_vec();
            cycle.push(module);
            return Some(cycle.join(" → "));
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for next in depends.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, depends, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    let cycles: Vec<String> = depends
        .keys()
        .filter_map(|module| visit(module, &depends, &mut Vec::new(), &mut done))
        .collect();
    assert_none("a cycle among the server's modules", cycles);
}
