//! The read path: resolve the columns once, read every key in one batched lookup, and lay
//! each row's values out by column offset straight into the wire response.

use std::fmt::Display;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use featurestore::domain::{ReadRequest, Timestamp, Value, ValueType};
use featurestore::proto;

use super::read_tally::{ReadTally, ages_on};
use super::{Core, PolicyInForce};
use crate::error::Error;
use crate::registry::{Feature, Surface};
use crate::storage::codec::{CodecError, Payload, Provenance, RowView};
use crate::storage::{RowFound, RowKey, Store};

/// Keys a part of a split read has at least: below it, handing a part to another core
/// costs more than reading it.
const PART_KEYS_MIN: usize = 128;

/// Counts a large read (one that may be split) for as long as it runs.
struct LargeRead<'a>(Option<&'a AtomicUsize>);

impl<'a> LargeRead<'a> {
    fn enter(core: &'a Core, keys: usize) -> LargeRead<'a> {
        LargeRead((keys >= 2 * PART_KEYS_MIN).then(|| {
            core.large_reads.fetch_add(1, Ordering::Relaxed);
            &core.large_reads
        }))
    }
}

impl Drop for LargeRead<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What every part of a read shares.
struct Part<'a> {
    fill: &'a Fill<'a>,
    surfaces: &'a [Option<&'a Surface>],
    store: &'a dyn Store,
}

impl Part<'_> {
    /// Reads `known` keys and fills their rows: `positions` says where each key's row is in
    /// the answer, whose rows from `first_row` on are `rows`.
    fn visit(
        &self,
        known: &[RowKey],
        positions: &[usize],
        first_row: usize,
        rows: &mut [proto::FeatureRow],
        tally: &mut ReadTally,
    ) -> Result<(), Error> {
        let fill = self.fill;
        self.store.visit_rows(known, &mut |index, found| {
            let position = positions[index];
            let surface = self.surfaces[position].expect("only keys with a known surface are read");
            let row = &mut rows[position - first_row];
            match found {
                RowFound::Row(stored) => {
                    if let Err(error) = fill.row(row, surface, Some(stored), tally) {
                        fill.damaged(row, known[index].user_id, surface, &error);
                    }
                }
                RowFound::Missing => fill
                    .row(row, surface, None, tally)
                    .expect("a missing row has no value to find damaged"),
                RowFound::Corrupt(problem) => {
                    fill.damaged(row, known[index].user_id, surface, &problem);
                }
                RowFound::Unavailable(problem) => {
                    fill.unavailable(row, known[index].user_id, surface, &problem);
                }
            }
        })?;
        Ok(())
    }
}

/// One response column: a feature and where its values sit in each row.
struct Column<'a> {
    feature: &'a Feature,
    offset: usize,
}

/// Lengths of each per-type value array of every row.
#[derive(Default, Clone, Copy)]
struct RowShape {
    floats: usize,
    int64s: usize,
    strings: usize,
    sparse: usize,
}

impl Core {
    /// Answers a batched read: one row per key, in request order.
    pub fn read(&self, request: &ReadRequest) -> Result<proto::GetFeaturesResponse, Error> {
        self.read_counted(request, &mut ReadTally::default())
    }

    /// [`Core::read`], counting into `tally` what it serves (statuses, ages of the values).
    pub fn read_counted(
        &self,
        request: &ReadRequest,
        tally: &mut ReadTally,
    ) -> Result<proto::GetFeaturesResponse, Error> {
        self.read_in_parts(request, tally, None)
    }

    /// How many parts a read of `keys` keys is split into: one per core no other large
    /// read is using, each of at least [`PART_KEYS_MIN`] keys; one when the server is busy.
    fn read_parts(&self, keys: usize) -> usize {
        let busy = self.large_reads.load(Ordering::Relaxed);
        let idle = rayon::current_num_threads().saturating_sub(busy.saturating_sub(1));
        (keys / PART_KEYS_MIN).min(idle).max(1)
    }

    /// [`Core::read_counted`] in `parts` parts (`None`: as [`Core::read_parts`] decides).
    fn read_in_parts(
        &self,
        request: &ReadRequest,
        tally: &mut ReadTally,
        parts: Option<usize>,
    ) -> Result<proto::GetFeaturesResponse, Error> {
        let now = self.clock.now();
        let in_force = self.policy_in_force();
        let guard = ReadGuard {
            core: self,
            in_force: &in_force,
        };
        // Keys of a batch name few surfaces: the last one found is compared first.
        let mut last: Option<(&str, Option<&Surface>)> = None;
        let surfaces: Vec<Option<&Surface>> = request
            .keys
            .iter()
            .map(|key| match last {
                Some((name, surface)) if name == key.surface => surface,
                _ => {
                    let surface = self.registry.surface(&key.surface);
                    last = Some((&key.surface, surface));
                    surface
                }
            })
            .collect();
        let features = self.select_features(request, &surfaces)?;
        let (columns, shape) = lay_out(&features);

        let by_feature_id = columns_by_feature_id(&columns);

        let fill = Fill {
            columns: &columns,
            by_feature_id: &by_feature_id,
            shape,
            include_event_times: request.include_event_times,
            now,
            guard: &guard,
        };
        let mut rows: Vec<proto::FeatureRow> = surfaces
            .iter()
            .map(|surface| {
                let mut row = fill.empty();
                if surface.is_none() {
                    row.status = proto::RowStatus::UnknownSurface as i32;
                }
                row
            })
            .collect();
        let (known, positions) = known_keys(request, &surfaces);
        let span = tracing::debug_span!("read_rows", keys = known.len()).entered();
        let _large = LargeRead::enter(self, known.len());
        let parts = parts.unwrap_or_else(|| self.read_parts(known.len()));
        let part = Part {
            fill: &fill,
            surfaces: &surfaces,
            store: self.store.as_ref(),
        };
        if parts <= 1 {
            part.visit(&known, &positions, 0, &mut rows, tally)?;
        } else {
            // Contiguous runs of the keys, each filling the run of rows its keys answer.
            let mut work = Vec::with_capacity(parts);
            let mut rest = rows.as_mut_slice();
            let mut first_row = 0;
            for index in 0..parts {
                let keys = index * known.len() / parts..(index + 1) * known.len() / parts;
                let end_row = match positions.get(keys.end) {
                    Some(&next) if index + 1 < parts => next,
                    _ => first_row + rest.len(),
                };
                let (mine, others) = std::mem::take(&mut rest).split_at_mut(end_row - first_row);
                work.push((keys, first_row, mine, ReadTally::default()));
                (rest, first_row) = (others, end_row);
            }
            let request_span = tracing::Span::current();
            let visited: Vec<Result<(), Error>> = work
                .par_iter_mut()
                .map(|(keys, first_row, rows, tally)| {
                    let _span = request_span.enter();
                    part.visit(
                        &known[keys.clone()],
                        &positions[keys.clone()],
                        *first_row,
                        rows,
                        tally,
                    )
                })
                .collect();
            visited.into_iter().collect::<Result<(), Error>>()?;
            for (_, _, _, part_tally) in work {
                tally.absorb(part_tally);
            }
        }
        drop(span);
        for row in &rows {
            if let Some(count) = usize::try_from(row.status)
                .ok()
                .and_then(|status| tally.rows.get_mut(status))
            {
                *count += 1;
            }
        }

        Ok(proto::GetFeaturesResponse {
            columns: response_columns(&columns),
            rows,
        })
    }

    /// The requested features, or every feature registered for a surface of the request.
    fn select_features(
        &self,
        request: &ReadRequest,
        surfaces: &[Option<&Surface>],
    ) -> Result<Vec<&Feature>, Error> {
        if request.features.is_empty() {
            return Ok(self
                .registry
                .features()
                .iter()
                .filter(|feature| {
                    surfaces
                        .iter()
                        .flatten()
                        .any(|surface| feature.surfaces.contains(&surface.id))
                })
                .collect());
        }
        request
            .features
            .iter()
            .enumerate()
            .map(|(index, name)| {
                self.registry
                    .feature(name)
                    .ok_or_else(|| Error::UnknownFeature {
                        index,
                        name: name.clone(),
                    })
            })
            .collect()
    }
}

/// The keys of `request` whose surface is known, and where each one's row is in the
/// answer.
fn known_keys(request: &ReadRequest, surfaces: &[Option<&Surface>]) -> (Vec<RowKey>, Vec<usize>) {
    request
        .keys
        .iter()
        .zip(surfaces)
        .enumerate()
        .filter_map(|(position, (key, surface))| {
            surface.map(|surface| {
                let key = RowKey {
                    user_id: key.user_id,
                    surface: surface.id,
                };
                (key, position)
            })
        })
        .unzip()
}

/// The columns of a response, as the wire names them.
fn response_columns(columns: &[Column<'_>]) -> Vec<proto::FeatureColumn> {
    columns
        .iter()
        .map(|column| proto::FeatureColumn {
            name: column.feature.name.clone(),
            value_type: proto::ValueType::from(column.feature.value_type) as i32,
            dimension: column_width(column.feature) as u32
                * u32::from(is_float_column(column.feature)),
            offset: column.offset as u32,
        })
        .collect()
}

fn is_float_column(feature: &Feature) -> bool {
    matches!(
        feature.value_type,
        ValueType::Float | ValueType::FloatVector
    )
}

/// Elements a column takes in its type's array.
fn column_width(feature: &Feature) -> usize {
    match feature.value_type {
        ValueType::FloatVector => feature.dimension as usize,
        ValueType::Float | ValueType::Int64 | ValueType::String | ValueType::Sparse => 1,
    }
}

fn lay_out<'a>(features: &[&'a Feature]) -> (Vec<Column<'a>>, RowShape) {
    let mut shape = RowShape::default();
    let columns = features
        .iter()
        .map(|&feature| {
            let next = match feature.value_type {
                ValueType::Float | ValueType::FloatVector => &mut shape.floats,
                ValueType::Int64 => &mut shape.int64s,
                ValueType::String => &mut shape.strings,
                ValueType::Sparse => &mut shape.sparse,
            };
            let offset = *next;
            *next += column_width(feature);
            Column { feature, offset }
        })
        .collect();
    (columns, shape)
}

fn empty_row(columns: usize, shape: RowShape, include_event_times: bool) -> proto::FeatureRow {
    proto::FeatureRow {
        status: proto::RowStatus::Ok as i32,
        statuses: vec![proto::ValueStatus::Unspecified as i32; columns],
        float_values: vec![0.0; shape.floats],
        int64_values: vec![0; shape.int64s],
        string_values: vec![String::new(); shape.strings],
        sparse_values: vec![proto::SparseVector::default(); shape.sparse],
        event_times_unix_micros: if include_event_times {
            vec![0; columns]
        } else {
            Vec::new()
        },
    }
}

/// Defense in depth: the write path is where the policy is enforced, but a value is served
/// only if it was admitted under a bundle whose values are served as they are, and if the
/// bundle in force does not refuse its labels on the reading surface outright.
struct ReadGuard<'a> {
    core: &'a Core,
    in_force: &'a PolicyInForce,
}

impl ReadGuard<'_> {
    fn allows(&self, provenance: &Provenance, surface: &Surface) -> bool {
        let Some(source) = self.core.registry.source_by_id(provenance.source) else {
            return false;
        };
        self.in_force
            .served_versions
            .contains(&provenance.policy_version)
            && self.in_force.policy.labels_allowed(
                source.kind,
                provenance.sensitivity,
                surface.purpose,
            )
    }
}

/// Indices of the columns in feature id order: the order of a stored row's values.
fn columns_by_feature_id(columns: &[Column<'_>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..columns.len()).collect();
    order.sort_unstable_by_key(|&index| columns[index].feature.id);
    order
}

/// What every row of a read is filled from.
struct Fill<'a> {
    columns: &'a [Column<'a>],
    by_feature_id: &'a [usize],
    shape: RowShape,
    include_event_times: bool,
    now: Timestamp,
    guard: &'a ReadGuard<'a>,
}

impl Fill<'_> {
    /// A row with every value zero and no status yet.
    fn empty(&self) -> proto::FeatureRow {
        empty_row(self.columns.len(), self.shape, self.include_event_times)
    }

    /// Marks a row whose stored bytes are damaged: nothing of it is served.
    fn damaged(
        &self,
        row: &mut proto::FeatureRow,
        user_id: u64,
        surface: &Surface,
        problem: &dyn Display,
    ) {
        tracing::warn!(user_id, surface = %surface.name, %problem, "stored row does not decode");
        self.unserved(row, proto::RowStatus::DataLoss);
    }

    /// Marks a row whose part of the engine did not answer: nothing served, the batch goes on.
    fn unavailable(
        &self,
        row: &mut proto::FeatureRow,
        user_id: u64,
        surface: &Surface,
        problem: &dyn Display,
    ) {
        tracing::warn!(user_id, surface = %surface.name, %problem, "stored row unavailable");
        self.unserved(row, proto::RowStatus::Unavailable);
    }

    /// Empties a row and gives it `status`.
    fn unserved(&self, row: &mut proto::FeatureRow, status: proto::RowStatus) {
        *row = self.empty();
        row.status = status as i32;
    }

    /// Fills one row from its stored values: one pass over both the row and the columns,
    /// each in feature id order. Values after the last column asked for are not read (the
    /// row's checksum was checked whole).
    fn row(
        &self,
        row: &mut proto::FeatureRow,
        surface: &Surface,
        stored: Option<RowView<'_>>,
        tally: &mut ReadTally,
    ) -> Result<(), CodecError> {
        let ReadTally {
            values: value_statuses,
            ages,
            ..
        } = tally;
        let ages = ages_on(ages, surface.id);
        let mut values = stored.map(|view| view.values());
        let mut next = || values.as_mut().and_then(Iterator::next).transpose();
        let mut current = next()?;
        let mut shared: Option<(u16, Provenance, bool)> = None;
        for &index in self.by_feature_id {
            let column = &self.columns[index];
            let feature = column.feature;
            while let Some(value) = current.filter(|value| value.feature < feature.id) {
                debug_assert!(value.feature < feature.id);
                current = next()?;
            }
            // A value whose type no longer matches the registry cannot be served.
            let found = current
                .filter(|value| value.feature == feature.id && accepts(feature, &value.payload))
                .zip(stored)
                .map(|(value, view)| {
                    // Values written together share their provenance record: it is read
                    // and judged once for all of them.
                    let (provenance, allowed) = match shared {
                        Some((index, provenance, allowed)) if index == value.provenance => {
                            (provenance, allowed)
                        }
                        _ => {
                            let provenance = view.provenance(value.provenance);
                            let allowed = self.guard.allows(&provenance, surface);
                            shared = Some((value.provenance, provenance, allowed));
                            (provenance, allowed)
                        }
                    };
                    (value.payload, provenance, allowed)
                });
            let status = if !feature.surfaces.contains(&surface.id) {
                proto::ValueStatus::NotRegisteredForSurface
            } else {
                match found {
                    Some((_, provenance, allowed))
                        if provenance.expires_at > self.now && !allowed =>
                    {
                        proto::ValueStatus::WithheldByPolicy
                    }
                    Some((payload, provenance, _)) if provenance.expires_at > self.now => {
                        put_payload(row, column, payload);
                        let event_time = provenance.event_time.unix_micros();
                        if let Some(cell) = row.event_times_unix_micros.get_mut(index) {
                            *cell = event_time;
                        }
                        ages.add(self.now.unix_micros().saturating_sub(event_time));
                        proto::ValueStatus::Present
                    }
                    _ if feature.default.is_some() => {
                        put_value(
                            row,
                            column,
                            feature.default.as_ref().expect("checked just above"),
                        );
                        proto::ValueStatus::Defaulted
                    }
                    Some(_) => proto::ValueStatus::Expired,
                    None => proto::ValueStatus::NotFound,
                }
            };
            row.statuses[index] = status as i32;
            value_statuses[status as usize] += 1;
        }
        Ok(())
    }
}

/// Whether a stored value still has the type (and dimension) its feature is registered with.
fn accepts(feature: &Feature, payload: &Payload<'_>) -> bool {
    match payload {
        Payload::FloatVector(elements) => {
            feature.value_type == ValueType::FloatVector
                && elements.len() == feature.dimension as usize
        }
        other => other.value_type() == feature.value_type,
    }
}

fn put_payload(row: &mut proto::FeatureRow, column: &Column<'_>, payload: Payload<'_>) {
    match payload {
        Payload::Float(number) => row.float_values[column.offset] = number,
        Payload::FloatVector(elements) => {
            elements.copy_to(&mut row.float_values[column.offset..column.offset + elements.len()]);
        }
        Payload::Int64(number) => row.int64_values[column.offset] = number,
        Payload::String(text) => text.clone_into(&mut row.string_values[column.offset]),
        Payload::Sparse(entries) => {
            let sparse = &mut row.sparse_values[column.offset];
            sparse.topics = entries.iter().map(|(topic, _)| topic.to_owned()).collect();
            sparse.weights = entries.iter().map(|(_, weight)| weight).collect();
        }
    }
}

/// Puts a feature's registered default.
fn put_value(row: &mut proto::FeatureRow, column: &Column<'_>, value: &Value) {
    match value {
        Value::Float(number) => row.float_values[column.offset] = *number,
        Value::FloatVector(elements) => {
            row.float_values[column.offset..column.offset + elements.len()]
                .copy_from_slice(elements);
        }
        Value::Int64(number) => row.int64_values[column.offset] = *number,
        Value::String(text) => row.string_values[column.offset].clone_from(text),
        Value::Sparse(entries) => {
            let sparse = &mut row.sparse_values[column.offset];
            sparse.topics = entries.iter().map(|(topic, _)| topic.clone()).collect();
            sparse.weights = entries.iter().map(|(_, weight)| *weight).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use featurestore::domain::{ReadKey, WriteRequest};

    use super::*;
    use crate::clock::ManualClock;
    use crate::core::{adult_on_facebook, hiking_row, test_core};

    /// 2026-06-01T00:00:00Z.
    const NOW: i64 = 1_780_272_000_000_000;

    #[test]
    fn a_read_split_into_parts_answers_as_one() {
        let directory = tempfile::tempdir().expect("temp dir");
        let clock = Arc::new(ManualClock::new(Timestamp::from_unix_micros(NOW)));
        let store = crate::core::test_store(directory.path(), clock.clone());
        let core = test_core(directory.path(), Arc::new(store), clock);
        for user_id in 1..=300 {
            core.set_user_state(&adult_on_facebook(user_id, "US"), "tests")
                .expect("state");
        }
        let request = WriteRequest {
            idempotency_key: "rows".to_string(),
            // Ages differ per user, so that the parts count different age buckets.
            rows: (1..=300)
                .map(|user_id| {
                    hiking_row(user_id, user_id as f32, NOW - user_id as i64 * 600_000_000)
                })
                .collect(),
        };
        core.write(&request, 1).expect("write");
        // Stored rows, missing ones, unknown surfaces and a key asked twice, in no order.
        let keys = (0..700u64)
            .map(|index| ReadKey {
                user_id: (index * 7919) % 400 + 1,
                surface: match index % 50 {
                    0 => "no_such_surface",
                    1 => "instagram_reels",
                    _ => "facebook_feed",
                }
                .to_string(),
            })
            .collect();
        let request = ReadRequest {
            keys,
            features: vec!["interest_hiking".to_string()],
            include_event_times: true,
        };
        let read = |parts| {
            let mut tally = ReadTally::default();
            let response = core
                .read_in_parts(&request, &mut tally, Some(parts))
                .expect("read");
            let mut ages: Vec<_> = tally
                .ages
                .iter()
                .map(|(surface, ages)| (*surface, ages.buckets, ages.count, ages.sum_micros))
                .collect();
            ages.sort_unstable_by_key(|(surface, ..)| *surface);
            (response, tally.rows, tally.values, ages)
        };
        let whole = read(1);
        assert_eq!(whole.0.rows.len(), 700);
        assert!(whole.1[proto::RowStatus::UnknownSurface as usize] > 0);
        assert!(whole.2[proto::ValueStatus::Present as usize] > 0);
        for parts in [2, 3, 5] {
            let split = read(parts);
            assert!(split.0 == whole.0, "the answer differs in {parts} parts");
            assert_eq!(split.1, whole.1, "rows counted in {parts} parts");
            assert_eq!(split.2, whole.2, "values counted in {parts} parts");
            assert_eq!(split.3, whole.3, "ages counted in {parts} parts");
        }
        // A read this large is split when nothing else runs.
        assert_eq!(core.read_parts(700), rayon::current_num_threads().min(5));
        assert_eq!(core.read_parts(200), 1);
    }
}
