//! The write path: decide per (feature, target surface) whether a value is admitted, merge
//! the admitted values into the store atomically with the idempotency record, and answer
//! with a verdict per feature.

use featurestore::domain::{FeatureWrite, Timestamp, WriteRequest, WriteRow};
use featurestore::proto::{self, ReasonCode};
use prost::Message;

use super::Core;
use crate::error::Error;
use crate::registry::{Source, Surface};
use crate::storage::{Applied, IdempotencyRecord, RowKey, RowWrite, StoredValue, ValueOutcome};

/// Where an admitted value went: which storage row, and which value of it.
#[derive(Clone, Copy)]
struct Placement {
    write: usize,
    value: usize,
}

/// The decision for one (feature, target surface) before storage answers.
enum Decision {
    Admitted(Placement),
    Refused(Vec<ReasonCode>),
}

impl Core {
    /// Applies a batched write; `fingerprint` identifies the request's content so that a
    /// reused idempotency key is told apart from a retry.
    pub fn write(
        &self,
        request: &WriteRequest,
        fingerprint: u64,
    ) -> Result<proto::WriteFeaturesResponse, Error> {
        if request.rows.is_empty() {
            return Ok(proto::WriteFeaturesResponse::default());
        }
        let now = self.clock.now();
        let mut writes: Vec<RowWrite> = Vec::new();
        // decisions[row][feature][surface]
        let decisions: Vec<Vec<Vec<Decision>>> = request
            .rows
            .iter()
            .map(|row| self.decide_row(row, now, &mut writes))
            .collect();

        let record = IdempotencyRecord {
            key: request.idempotency_key.clone(),
            fingerprint,
            created_at: now,
        };
        let replay_since = Timestamp::from_unix_micros(now.unix_micros().saturating_sub(
            i64::try_from(self.idempotency_window.as_micros()).unwrap_or(i64::MAX),
        ));
        let mut fresh = None;
        let applied = self
            .store
            .apply_write(&record, replay_since, &writes, &mut |outcomes| {
                let response = answer(request, &decisions, &writes, outcomes);
                let encoded = response.encode_to_vec();
                fresh = Some(response);
                encoded
            })?;
        match applied {
            Applied::Fresh { .. } => {
                Ok(fresh.expect("the store builds the answer of every fresh write"))
            }
            Applied::Replayed {
                fingerprint: stored,
                answer,
            } => {
                if stored != fingerprint {
                    return Err(Error::IdempotencyKeyReused {
                        key: request.idempotency_key.clone(),
                    });
                }
                let mut response = proto::WriteFeaturesResponse::decode(answer.as_slice())
                    .map_err(|error| Error::CorruptReplay(error.to_string()))?;
                response.replayed = true;
                Ok(response)
            }
        }
    }

    fn decide_row(
        &self,
        row: &WriteRow,
        now: Timestamp,
        writes: &mut Vec<RowWrite>,
    ) -> Vec<Vec<Decision>> {
        let source = self.registry.source(&row.provenance.source);
        let surfaces: Vec<Option<&Surface>> = row
            .target_surfaces
            .iter()
            .map(|name| self.registry.surface(name))
            .collect();
        // The storage row of each target surface, created when a first value is admitted.
        let mut write_of_surface: Vec<Option<usize>> = vec![None; surfaces.len()];
        row.features
            .iter()
            .map(|feature_write| {
                surfaces
                    .iter()
                    .enumerate()
                    .map(|(surface_index, surface)| {
                        let (stored, reasons) =
                            self.admit(row, feature_write, source, *surface, now);
                        let Some(stored) = stored else {
                            return Decision::Refused(reasons);
                        };
                        let surface = surface.expect("a value is only admitted to a known surface");
                        let write = *write_of_surface[surface_index].get_or_insert_with(|| {
                            writes.push(RowWrite {
                                key: RowKey {
                                    user_id: row.user_id,
                                    surface: surface.id,
                                },
                                values: Vec::new(),
                            });
                            writes.len() - 1
                        });
                        writes[write].values.push(stored);
                        Decision::Admitted(Placement {
                            write,
                            value: writes[write].values.len() - 1,
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Checks one value against the registry for one surface: the value to store, or the
    /// reasons it is refused.
    fn admit(
        &self,
        row: &WriteRow,
        feature_write: &FeatureWrite,
        source: Option<&Source>,
        surface: Option<&Surface>,
        now: Timestamp,
    ) -> (Option<StoredValue>, Vec<ReasonCode>) {
        let feature = self.registry.feature(&feature_write.name);
        let mut reasons = Vec::new();
        if feature.is_none() {
            reasons.push(ReasonCode::UnknownFeature);
        }
        if surface.is_none() {
            reasons.push(ReasonCode::UnknownSurface);
        }
        if source.is_none() {
            reasons.push(ReasonCode::UnknownSource);
        }
        let (Some(feature), Some(surface), Some(source)) = (feature, surface, source) else {
            return (None, reasons);
        };
        let fits = feature.surfaces.contains(&surface.id)
            && feature.sources.contains(&source.id)
            && feature.accepts(&feature_write.value);
        if !fits {
            return (None, vec![ReasonCode::SchemaViolation]);
        }
        let ttl = feature_write
            .ttl
            .map_or(feature.ttl, |requested| requested.min(feature.ttl));
        let stored = StoredValue {
            feature: feature.id,
            event_time: row.provenance.interaction_time,
            write_time: now,
            expires_at: now.saturating_add(ttl),
            source: source.id,
            sensitivity: feature.sensitivity,
            policy_version: 0,
            value: feature_write.value.clone(),
        };
        (Some(stored), reasons)
    }
}

/// Builds the response from the decisions and the storage outcomes.
fn answer(
    request: &WriteRequest,
    decisions: &[Vec<Vec<Decision>>],
    writes: &[RowWrite],
    outcomes: &[Vec<ValueOutcome>],
) -> proto::WriteFeaturesResponse {
    let rows = request
        .rows
        .iter()
        .zip(decisions)
        .map(|(row, row_decisions)| proto::RowResult {
            verdicts: row
                .features
                .iter()
                .zip(row_decisions)
                .map(|(feature, surface_decisions)| {
                    verdict(
                        &feature.name,
                        &row.target_surfaces,
                        surface_decisions,
                        writes,
                        outcomes,
                    )
                })
                .collect(),
        })
        .collect();
    proto::WriteFeaturesResponse {
        rows,
        replayed: false,
        policy_bundle_hash: String::new(),
    }
}

fn verdict(
    feature: &str,
    target_surfaces: &[String],
    decisions: &[Decision],
    writes: &[RowWrite],
    outcomes: &[Vec<ValueOutcome>],
) -> proto::FeatureVerdict {
    let mut reasons: Vec<ReasonCode> = Vec::new();
    let mut admitted = 0;
    let mut expires_at = 0;
    let surfaces = target_surfaces
        .iter()
        .zip(decisions)
        .map(|(surface, decision)| match decision {
            Decision::Admitted(placement) => {
                admitted += 1;
                expires_at = expires_at.max(
                    writes[placement.write].values[placement.value]
                        .expires_at
                        .unix_micros(),
                );
                let outcome = match outcomes[placement.write][placement.value] {
                    ValueOutcome::Stored => proto::Outcome::Stored,
                    ValueOutcome::Superseded => proto::Outcome::Superseded,
                };
                proto::SurfaceOutcome {
                    surface: surface.clone(),
                    outcome: outcome as i32,
                    reasons: Vec::new(),
                }
            }
            Decision::Refused(refusals) => {
                for reason in refusals {
                    if !reasons.contains(reason) {
                        reasons.push(*reason);
                    }
                }
                proto::SurfaceOutcome {
                    surface: surface.clone(),
                    outcome: proto::Outcome::Refused as i32,
                    reasons: refusals.iter().map(|reason| *reason as i32).collect(),
                }
            }
        })
        .collect();
    let verdict = match admitted {
        0 => proto::Verdict::Deny,
        all if all == decisions.len() => proto::Verdict::Allow,
        _ => proto::Verdict::AllowWithTransform,
    };
    proto::FeatureVerdict {
        feature: feature.to_string(),
        verdict: verdict as i32,
        reasons: reasons.into_iter().map(|reason| reason as i32).collect(),
        surfaces,
        expires_at_unix_micros: expires_at,
    }
}
