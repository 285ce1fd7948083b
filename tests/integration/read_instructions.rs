//! The read path's instruction count: callgrind counts the instructions of decoding 500-key
//! requests, reading them and encoding the answers (exact and repeatable where wall time
//! is not), and the count is held against the baseline committed in
//! `tests/read_path.instructions`. It measures the test build, so it catches work added
//! per key or per value (an allocation, a copy, a lookup), not the compiler's codegen.

use std::path::Path;
use std::process::Command;

use featurestore::RequestLimits;
use featurestore::proto;
use featurestore_tests::workload::{InProcessStore, Random, random_read};
use prost::Message;

/// This module's workload test, as libtest names it.
const WORKLOAD_TEST: &str = "read_instructions::read_path_workload";
const USERS: u64 = 200;
const READS: usize = 2;
const KEYS: usize = 500;
/// A count this much over the baseline fails; one this much under it asks for a new one.
const TOLERANCE: f64 = 0.25;
/// Set to rewrite the baseline with the count just measured.
const UPDATE_VARIABLE: &str = "READ_PATH_BASELINE_UPDATE";

fn baseline_path() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/read_path.instructions"
    ))
}

// Not a test on its own: the process that callgrind measures. The check below runs this
// binary again under valgrind with `--ignored --exact` naming this function, so that only
// the workload's instructions are counted; run directly it would measure nothing.
#[test]
#[ignore = "the workload callgrind measures; run by read_path_instructions_hold_to_the_baseline"]
fn read_path_workload() {
    // One reading thread: a read split across threads would do part of its work where
    // callgrind does not count it (outside `serve_reads`).
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("the first pool of this process");
    let store = InProcessStore::with_users(USERS);
    let limits = RequestLimits::default();
    let mut random = Random(7);
    let requests: Vec<Vec<u8>> = (0..READS)
        .map(|_| {
            proto::GetFeaturesRequest::from(random_read(&mut random, USERS, KEYS)).encode_to_vec()
        })
        .collect();
    // Once to fill the caches, so that the measured reads find every row in the row cache.
    let warm = answer(&store, &limits, &requests);
    let measured = serve_reads(&store, &limits, &requests);
    assert_eq!(warm, measured, "the same reads answer the same bytes");
    assert!(
        measured > READS * KEYS * 20 * 4,
        "the answers hold the values"
    );
}

/// The measured reads: callgrind counts what runs inside this function, by its name.
#[inline(never)]
fn serve_reads(store: &InProcessStore, limits: &RequestLimits, requests: &[Vec<u8>]) -> usize {
    // Not a tail call, which callgrind would not see leave this function.
    std::hint::black_box(answer(store, limits, requests))
}

/// What read requests cost the server but the transport: decode, parse, read, encode.
fn answer(store: &InProcessStore, limits: &RequestLimits, requests: &[Vec<u8>]) -> usize {
    requests
        .iter()
        .map(|bytes| {
            let request = proto::GetFeaturesRequest::decode(bytes.as_slice()).expect("decodes");
            let request = limits.parse_read(request).expect("a valid read");
            let response = store.core.read(&request).expect("read");
            response.encode_to_vec().len()
        })
        .sum()
}

#[test]
fn read_path_instructions_hold_to_the_baseline() {
    let executable = std::env::current_exe().expect("the test binary's path");
    let directory = tempfile::tempdir().expect("temporary directory");
    let output_file = directory.path().join("callgrind.out");
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*serve_reads*")
        .arg(format!("--callgrind-out-file={}", output_file.display()))
        .arg(&executable)
        .args([WORKLOAD_TEST, "--exact", "--ignored", "--test-threads=1"])
        .output();
    let run = match run {
        Ok(run) => run,
        Err(error) => panic!(
            "valgrind could not be run ({error}): `./dev test` installs it, or `apt-get install valgrind`"
        ),
    };
    assert!(
        run.status.success(),
        "the workload failed under callgrind:\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(&output_file).expect("callgrind's output");
    let measured = total_instructions(&report).expect("callgrind reports a total");
    let per_key = measured as f64 / (READS * KEYS) as f64;
    eprintln!("read path: {measured} instructions, {per_key:.0} per key read");

    if std::env::var_os(UPDATE_VARIABLE).is_some() {
        std::fs::write(
            baseline_path(),
            format!(
                "# Instructions callgrind counts for the read path check in\n\
                 # tests/integration/read_instructions.rs (test build). Rewrite with\n\
                 # {UPDATE_VARIABLE}=1 cargo test -p featurestore-tests --test integration read_instructions\n\
                 {measured}\n"
            ),
        )
        .expect("write the baseline");
        return;
    }
    let baseline = std::fs::read_to_string(baseline_path())
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| !line.starts_with('#') && !line.trim().is_empty())
                .and_then(|line| line.trim().parse::<u64>().ok())
        })
        .expect("tests/read_path.instructions holds the baseline count");
    let ratio = measured as f64 / baseline as f64;
    assert!(
        ratio <= 1.0 + TOLERANCE,
        "the read path runs {measured} instructions, {ratio:.2}x its baseline of {baseline}: \
         find what it now does per key, or, if the cost is deliberate, rewrite the baseline \
         with {UPDATE_VARIABLE}=1"
    );
    assert!(
        ratio >= 1.0 - TOLERANCE,
        "the read path runs {measured} instructions, {ratio:.2}x its baseline of {baseline}: \
         well done; lower the baseline with {UPDATE_VARIABLE}=1 so that it keeps guarding"
    );
}

/// The event total of a callgrind output file: its `summary:` line (or `totals:`).
fn total_instructions(report: &str) -> Option<u64> {
    report
        .lines()
        .find_map(|line| {
            line.strip_prefix("summary:")
                .or_else(|| line.strip_prefix("totals:"))
        })
        .and_then(|count| count.split_whitespace().next())
        .and_then(|count| count.parse().ok())
}
