//! Micro-benchmark of the read path's hot loop, without a server: per row (check a stored
//! row, read its values in place, or decode it whole as the write path does), and per
//! 500-key read through each layer, next to raw RocksDB `batched_multi_get` of the same
//! keys with the same options (the storage floor). Warm block cache; criterion statistics.
//!
//! Run with `cargo bench -p featurestore-tests --bench read_path`; `READ_PATH_USERS` sizes
//! the dataset (20,000 users × 3 surfaces by default). Criterion's `--save-baseline` and
//! `--baseline` compare two builds.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use featurestore::RequestLimits;
use featurestore::domain::ReadRequest;
use featurestore::proto;
use featurestore_server::registry::Registry;
use featurestore_server::storage::codec::{RowView, decode_row};
use featurestore_server::storage::keys::encode_row_key;
use featurestore_server::storage::{RocksStore, RowFound, RowKey, Store};
use featurestore_tests::workload::{InProcessStore, Random, random_read, registry_toml};
use prost::Message;

const KEYS: usize = 500;
const REQUESTS: usize = 16;

fn users() -> u64 {
    std::env::var("READ_PATH_USERS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000)
}

fn row_keys(registry: &Registry, request: &ReadRequest) -> Vec<RowKey> {
    request
        .keys
        .iter()
        .map(|key| RowKey {
            user_id: key.user_id,
            surface: registry.surface(&key.surface).expect("known surface").id,
        })
        .collect()
}

fn read_path(c: &mut Criterion) {
    let users = users();
    let store = InProcessStore::with_users(users);
    let registry = Registry::from_toml(&registry_toml()).expect("registry");
    let engine = RocksStore::open_engine_read_only(&store.database(), &store.storage)
        .expect("open the engine read-only");
    let features = engine
        .cf_handle("features")
        .expect("features column family");

    let mut random = Random(11);
    let requests: Vec<ReadRequest> = (0..REQUESTS)
        .map(|_| random_read(&mut random, users, KEYS))
        .collect();
    let keys: Vec<Vec<RowKey>> = requests
        .iter()
        .map(|request| row_keys(&registry, request))
        .collect();
    let sorted_keys: Vec<Vec<[u8; 10]>> = keys
        .iter()
        .map(|keys| {
            let mut encoded: Vec<[u8; 10]> = keys.iter().map(|&key| encode_row_key(key)).collect();
            encoded.sort_unstable();
            encoded
        })
        .collect();
    let wire: Vec<Vec<u8>> = requests
        .iter()
        .map(|request| proto::GetFeaturesRequest::from(request.clone()).encode_to_vec())
        .collect();
    let limits = RequestLimits::default();
    let row = engine
        .get_cf(features, encode_row_key(keys[0][0]))
        .expect("read a row")
        .expect("the row is stored");

    let mut group = c.benchmark_group("row");
    group.throughput(Throughput::Bytes(row.len() as u64));
    group.bench_function("check (RowView::parse)", |b| {
        b.iter(|| RowView::parse(black_box(&row)).expect("parses"));
    });
    group.bench_function("check + read every value in place", |b| {
        b.iter(|| {
            let view = RowView::parse(black_box(&row)).expect("parses");
            view.values()
                .map(|value| value.expect("reads").feature.0 as u64)
                .sum::<u64>()
        });
    });
    group.bench_function("decode owned (write path)", |b| {
        b.iter(|| decode_row(black_box(&row)).expect("decodes"));
    });
    group.finish();

    let mut group = c.benchmark_group("read 500 keys");
    group.throughput(Throughput::Elements(KEYS as u64));
    let mut next = 0;
    let mut cycle = move || {
        next = (next + 1) % REQUESTS;
        next
    };
    group.bench_function("floor: raw batched_multi_get", |b| {
        b.iter(|| {
            engine
                .batched_multi_get_cf(features, sorted_keys[cycle()].iter(), true)
                .into_iter()
                .filter(|value| matches!(value, Ok(Some(_))))
                .count()
        });
    });
    group.bench_function("Store::visit_rows (+ check each row)", |b| {
        b.iter(|| {
            let mut found = 0;
            store
                .store
                .visit_rows(&keys[cycle()], &mut |_, row| {
                    found += usize::from(matches!(row, RowFound::Row(_)));
                })
                .expect("read");
            found
        });
    });
    group.bench_function("Core::read (+ columns, guard, response rows)", |b| {
        b.iter(|| store.core.read(&requests[cycle()]).expect("read"));
    });
    group.bench_function("decode + parse + read + encode (no transport)", |b| {
        b.iter(|| {
            let request =
                proto::GetFeaturesRequest::decode(wire[cycle()].as_slice()).expect("decodes");
            let request = limits.parse_read(request).expect("valid");
            store
                .core
                .read(&request)
                .expect("read")
                .encode_to_vec()
                .len()
        });
    });
    group.finish();
}

criterion_group!(benches, read_path);
criterion_main!(benches);
