//! The write path: fence the request against each user's state, decide per (feature,
//! target surface) with the registry and the compiled policy, merge the admitted values
//! into the store atomically with the idempotency record, and answer with a verdict per
//! feature. `explain` runs the same decisions without storing.

use std::collections::HashMap;
use std::sync::Arc;

use featurestore::domain::{FeatureWrite, Timestamp, WriteRequest, WriteRow};
use featurestore::proto::{self, ReasonCode};
use prost::Message;

use super::Core;
use crate::audit::{AuditAction, AuditEntry, Pseudonym};
use crate::error::Error;
use crate::policy::{Policy, Reasons, TopicClass, ValueFacts};
use crate::registry::{Feature, Source, Surface};
use crate::storage::{
    Applied, ErasureState, IdempotencyRecord, RowKey, RowWrite, StorageError, StoredValue,
    UserState, UserWrite, ValueOutcome,
};

/// Times a write is decided again when a user's state changed between the decision and
/// the write; past that the caller gets ABORTED and may retry.
const DECISION_ATTEMPTS: usize = 3;

/// What the write path needs beyond the policy.
#[derive(Debug)]
pub(super) struct WriteSettings {
    /// How long an idempotency key's answer is replayed.
    pub(super) idempotency_window: std::time::Duration,
    /// How far past the clock an interaction time may be; later ones are refused.
    pub(super) interaction_time_skew_allowance: std::time::Duration,
}

/// Where an admitted value went: which storage row (in the order [`Core::decide_rows`]
/// made them), and which value of it.
#[derive(Clone, Copy)]
pub(super) struct Placement {
    pub write: usize,
    pub value: usize,
}

/// The decision for one (feature, target surface) before storage answers.
pub(super) enum Decision {
    Admitted(Placement),
    Refused(Reasons),
}

/// Everything decided for a request, ready to apply.
struct Plan {
    /// One share per user of the request, sorted by user id: the state generation it was
    /// decided with, and its admitted values grouped by storage row.
    shares: Vec<UserWrite>,
    /// Where each storage row of the decisions went: (share, row of the share).
    placed: Vec<(usize, usize)>,
    /// decisions[row][feature][target surface]
    decisions: Vec<Vec<Vec<Decision>>>,
}

impl Plan {
    /// The stored value an admitted decision placed.
    fn value(&self, placement: Placement) -> &StoredValue {
        let (share, row) = self.placed[placement.write];
        &self.shares[share].rows[row].values[placement.value]
    }

    /// The index of `user_id`'s share.
    fn share_of(&self, user_id: u64) -> usize {
        self.shares
            .binary_search_by_key(&user_id, |share| share.user_id)
            .expect("every user of the request has a share")
    }
}

/// The storage outcome of each admitted value, as far as known: per share, the outcomes
/// of each value of each of its rows.
type Outcomes = [Option<Vec<Vec<ValueOutcome>>>];

/// The request-level refusal of a row, if its user's state refuses every write: the user
/// is erased, the producer saw an older generation than the current one, or it states a
/// generation the store never issued (a newer one, or any for a user without state).
pub(super) fn fence_refusal(row: &WriteRow, state: Option<&UserState>) -> Option<ReasonCode> {
    let current = state.map_or(0, |state| state.generation);
    if state.is_some_and(|state| state.erasure != ErasureState::None) {
        Some(ReasonCode::UserErased)
    } else if row.user_state_generation < current {
        Some(ReasonCode::StaleGeneration)
    } else if row.user_state_generation > current {
        Some(ReasonCode::GenerationNotIssued)
    } else {
        None
    }
}

/// A value of a write, looked up and classified once for all of its target surfaces.
struct Candidate<'a> {
    feature: Option<&'a Feature>,
    /// What the taxonomy makes of its topics (for a registered feature).
    class: Option<TopicClass>,
    /// Refusals that hold on every surface: what the policy cannot place.
    unplaceable: Reasons,
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
        let policy = self.policy();
        let mut attempt = 1;
        loop {
            let now = self.clock.now();
            let mut plan = {
                let _span =
                    tracing::debug_span!("policy", rows = request.rows.len(), attempt).entered();
                self.plan(request, &policy, now)?
            };
            // The worst moment for a user's state to change: decided, not yet applied.
            fail::fail_point!("write-decided");
            self.attach_audit(request, &mut plan, &policy)?;
            let record = IdempotencyRecord {
                key: request.idempotency_key.clone(),
                fingerprint,
                created_at: now,
            };
            let replay_since = self.replay_since(now);
            let mut outcomes: Vec<Option<Vec<Vec<ValueOutcome>>>> = vec![None; plan.shares.len()];
            let span = tracing::debug_span!("storage", users = plan.shares.len()).entered();
            let applied = self.store.apply_write(
                &record,
                replay_since,
                &plan.shares,
                &mut |share, share_outcomes| {
                    outcomes[share] = Some(share_outcomes.to_vec());
                    let user_id = plan.shares[share].user_id;
                    let rows = rows_of(request, user_id);
                    let fragment = proto::WriteFeaturesResponse {
                        rows: answer_rows(request, &plan, &rows, Some(&outcomes)),
                        replayed: false,
                        policy_bundle_hash: policy.hash.clone(),
                    };
                    fragment.encode_to_vec()
                },
            );
            drop(span);
            return match applied {
                Ok(applied) => {
                    let response = compose(request, &plan, &applied, &outcomes, &policy)?;
                    if !response.replayed {
                        self.revalidate_if_policy_changed(
                            &policy,
                            plan.shares.iter().map(|share| share.user_id),
                        )?;
                    }
                    Ok(response)
                }
                Err(StorageError::IdempotencyKeyReused) => Err(Error::IdempotencyKeyReused {
                    key: request.idempotency_key.clone(),
                }),
                Err(StorageError::GenerationChanged { user_id, .. })
                    if attempt < DECISION_ATTEMPTS =>
                {
                    tracing::debug!(
                        user_id,
                        attempt,
                        "user state changed during a write; deciding again"
                    );
                    attempt += 1;
                    continue;
                }
                Err(StorageError::GenerationChanged { user_id, .. }) => {
                    Err(Error::WriteRaced { user_id })
                }
                Err(error) => Err(error.into()),
            };
        }
    }

    /// Gives each share its audit entries: the call's record goes with the first user's
    /// share, each refusal with its user's.
    fn attach_audit(
        &self,
        request: &WriteRequest,
        plan: &mut Plan,
        policy: &Policy,
    ) -> Result<(), Error> {
        let (call, refusals) = self.audit_entries(request, &plan.decisions, policy)?;
        plan.shares[0].audit.push(call);
        for (user_id, entry) in refusals {
            let share = plan.share_of(user_id);
            plan.shares[share].audit.push(entry);
        }
        Ok(())
    }

    /// The oldest idempotency record a write made `now` replays.
    fn replay_since(&self, now: Timestamp) -> Timestamp {
        Timestamp::from_unix_micros(now.unix_micros().saturating_sub(
            i64::try_from(self.writes.idempotency_window.as_micros()).unwrap_or(i64::MAX),
        ))
    }

    /// A bundle reload during the write may have started a purge that already passed these
    /// users; re-validate them under the bundle now in force so nothing stays stamped with
    /// the old one.
    pub(super) fn revalidate_if_policy_changed(
        &self,
        decided_with: &Arc<Policy>,
        users: impl IntoIterator<Item = u64>,
    ) -> Result<(), Error> {
        let policy = self.policy();
        if Arc::ptr_eq(decided_with, &policy) {
            return Ok(());
        }
        for user_id in users {
            self.revalidate_user(user_id, &policy, "policy-purge")?;
        }
        Ok(())
    }

    /// The audit entries of a write: one for the call, and one per feature refused on some
    /// or all of its target surfaces, with its user's id. Never a value.
    #[allow(clippy::type_complexity)]
    pub(super) fn audit_entries(
        &self,
        request: &WriteRequest,
        decisions: &[Vec<Vec<Decision>>],
        policy: &Policy,
    ) -> Result<(AuditEntry, Vec<(u64, AuditEntry)>), Error> {
        let caller = request
            .rows
            .first()
            .map_or("", |row| row.provenance.producer_id.as_str());
        let mut call = self.audit_entry(AuditAction::Write, caller, None)?;
        call.bundle_hash.clone_from(&policy.hash);
        call.subject = format!("{} rows", request.rows.len());
        let mut entries = Vec::new();
        // One pseudonym lookup per user, however many of its values were refused.
        let mut pseudonyms: HashMap<u64, Option<Pseudonym>> = HashMap::new();
        for (row, row_decisions) in request.rows.iter().zip(decisions) {
            for (feature, decisions) in row.features.iter().zip(row_decisions) {
                let mut refused_surfaces = Vec::new();
                let mut reasons = Reasons::NONE;
                for (surface, decision) in row.target_surfaces.iter().zip(decisions) {
                    if let Decision::Refused(refusal) = decision {
                        refused_surfaces.push(surface.as_str());
                        reasons = reasons.union(*refusal);
                    }
                }
                if refused_surfaces.is_empty() {
                    continue;
                }
                let action = if refused_surfaces.len() == decisions.len() {
                    AuditAction::FeatureDenied
                } else {
                    AuditAction::FeatureTransformed
                };
                let user = match pseudonyms.get(&row.user_id) {
                    Some(user) => *user,
                    None => {
                        let user = self.pseudonym(row.user_id, true)?;
                        pseudonyms.insert(row.user_id, user);
                        user
                    }
                };
                let mut entry = self.audit_entry(action, &row.provenance.producer_id, None)?;
                entry.user = user;
                entry.bundle_hash.clone_from(&policy.hash);
                entry.surfaces = refused_surfaces.join(",");
                entry.subject.clone_from(&feature.name);
                entry.reasons = reasons.bits();
                entries.push((row.user_id, entry));
            }
        }
        Ok((call, entries))
    }

    /// Decides a write exactly as [`Core::write`] would, without storing anything.
    pub fn explain(&self, request: &WriteRequest) -> Result<proto::ExplainWriteResponse, Error> {
        let policy = self.policy();
        let now = self.clock.now();
        match self.plan(request, &policy, now) {
            Ok(plan) => Ok(proto::ExplainWriteResponse {
                verdicts: Some(proto::WriteFeaturesResponse {
                    rows: answer_rows(
                        request,
                        &plan,
                        &(0..request.rows.len()).collect::<Vec<_>>(),
                        None,
                    ),
                    replayed: false,
                    policy_bundle_hash: policy.hash.clone(),
                }),
                request_refusal: ReasonCode::Unspecified as i32,
                refused_row: 0,
                policy_bundle_hash: policy.hash.clone(),
            }),
            Err(Error::Refused { reason, row, .. }) => Ok(proto::ExplainWriteResponse {
                verdicts: None,
                request_refusal: reason as i32,
                refused_row: u32::try_from(row).unwrap_or(u32::MAX),
                policy_bundle_hash: policy.hash.clone(),
            }),
            Err(error) => Err(error),
        }
    }

    /// The states of the users of `rows`, by user id (users without a state are absent).
    pub(super) fn user_states(&self, rows: &[WriteRow]) -> Result<HashMap<u64, UserState>, Error> {
        let mut users: Vec<u64> = rows.iter().map(|row| row.user_id).collect();
        users.sort_unstable();
        users.dedup();
        Ok(users
            .iter()
            .zip(self.store.read_user_states(&users)?)
            .filter_map(|(user_id, state)| state.map(|state| (*user_id, state)))
            .collect())
    }

    /// Decides every (feature, target surface) of `rows`: the admitted values grouped by
    /// storage row, and decisions[row][feature][target surface].
    #[allow(clippy::type_complexity)]
    pub(super) fn decide_rows(
        &self,
        rows: &[WriteRow],
        states: &HashMap<u64, UserState>,
        policy: &Policy,
        now: Timestamp,
    ) -> (Vec<RowWrite>, Vec<Vec<Vec<Decision>>>) {
        let mut writes = Vec::new();
        let decisions = rows
            .iter()
            .map(|row| self.decide_row(row, states.get(&row.user_id), policy, now, &mut writes))
            .collect();
        (writes, decisions)
    }

    /// Reads the users' states, applies the request-level fences, and decides every
    /// (feature, target surface).
    fn plan(&self, request: &WriteRequest, policy: &Policy, now: Timestamp) -> Result<Plan, Error> {
        let states = self.user_states(&request.rows)?;
        for (index, row) in request.rows.iter().enumerate() {
            let state = states.get(&row.user_id);
            if let Some(reason) = fence_refusal(row, state) {
                return Err(Error::Refused {
                    reason,
                    row: index,
                    current_generation: state.map_or(0, |state| state.generation),
                });
            }
        }
        let mut users: Vec<u64> = request.rows.iter().map(|row| row.user_id).collect();
        users.sort_unstable();
        users.dedup();
        let mut shares: Vec<UserWrite> = users
            .into_iter()
            .map(|user_id| UserWrite {
                user_id,
                generation: states.get(&user_id).map_or(0, |state| state.generation),
                rows: Vec::new(),
                audit: Vec::new(),
            })
            .collect();
        let (writes, decisions) = self.decide_rows(&request.rows, &states, policy, now);
        let placed = writes
            .into_iter()
            .map(|write| {
                let share = shares
                    .binary_search_by_key(&write.key.user_id, |share| share.user_id)
                    .expect("every user of the request has a share");
                shares[share].rows.push(write);
                (share, shares[share].rows.len() - 1)
            })
            .collect();
        Ok(Plan {
            shares,
            placed,
            decisions,
        })
    }

    fn decide_row(
        &self,
        row: &WriteRow,
        state: Option<&UserState>,
        policy: &Policy,
        now: Timestamp,
        writes: &mut Vec<RowWrite>,
    ) -> Vec<Vec<Decision>> {
        let source = self.registry.source(&row.provenance.source);
        let surfaces: Vec<Option<&Surface>> = row
            .target_surfaces
            .iter()
            .map(|name| self.registry.surface(name))
            .collect();
        let mut row_unplaceable = self.unplaceable(
            &row.provenance.origin_app,
            row.provenance.interaction_time,
            now,
        );
        if source.is_none() {
            row_unplaceable = row_unplaceable.with(ReasonCode::UnknownSource);
        }
        // The storage row of each target surface, created when a first value is admitted.
        let mut write_of_surface: Vec<Option<usize>> = vec![None; surfaces.len()];
        row.features
            .iter()
            .map(|feature_write| {
                let candidate = self.candidate(feature_write, row_unplaceable, policy);
                surfaces
                    .iter()
                    .enumerate()
                    .map(|(surface_index, surface)| {
                        let stored = match self.admit(
                            row,
                            feature_write,
                            &candidate,
                            source,
                            *surface,
                            state,
                            policy,
                            now,
                        ) {
                            Ok(stored) => stored,
                            Err(reasons) => return Decision::Refused(reasons),
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

    /// Looks a value's feature up and classifies its topics, once for all its surfaces.
    fn candidate<'a>(
        &'a self,
        feature_write: &FeatureWrite,
        row_unplaceable: Reasons,
        policy: &Policy,
    ) -> Candidate<'a> {
        let feature = self.registry.feature(&feature_write.name);
        let class = feature.map(|feature| {
            policy.classify(
                feature,
                feature_write.topic.as_ref().map(|topic| topic.id.as_str()),
                &feature_write.value,
            )
        });
        let mut unplaceable = row_unplaceable;
        if feature.is_none() {
            unplaceable = unplaceable.with(ReasonCode::UnknownFeature);
        }
        if class.is_some_and(|class| !class.canonical) {
            unplaceable = unplaceable.with(ReasonCode::NonCanonicalTopic);
        }
        Candidate {
            feature,
            class,
            unplaceable,
        }
    }

    /// What refuses a value whatever its surface because the policy cannot place it: an
    /// origin app no surface has, an interaction time later than the clock allows.
    pub(super) fn unplaceable(
        &self,
        origin_app: &str,
        interaction_time: Timestamp,
        now: Timestamp,
    ) -> Reasons {
        let mut reasons = Reasons::NONE;
        if !self.registry.knows_app(origin_app) {
            reasons = reasons.with(ReasonCode::UnknownApp);
        }
        if interaction_time > now.saturating_add(self.writes.interaction_time_skew_allowance) {
            reasons = reasons.with(ReasonCode::InteractionTimeInFuture);
        }
        reasons
    }

    /// Decides one value for one surface: what cannot be placed, the registry's checks,
    /// then the policy. Returns the value to store, or the reasons it is refused.
    #[allow(clippy::too_many_arguments)]
    fn admit(
        &self,
        row: &WriteRow,
        feature_write: &FeatureWrite,
        candidate: &Candidate<'_>,
        source: Option<&Source>,
        surface: Option<&Surface>,
        state: Option<&UserState>,
        policy: &Policy,
        now: Timestamp,
    ) -> Result<StoredValue, Reasons> {
        let mut reasons = candidate.unplaceable;
        if surface.is_none() {
            reasons = reasons.with(ReasonCode::UnknownSurface);
        }
        let (Some(feature), Some(class), Some(surface), Some(source), true) = (
            candidate.feature,
            candidate.class,
            surface,
            source,
            reasons.is_empty(),
        ) else {
            return Err(reasons);
        };
        let fits = feature.surfaces.contains(&surface.id)
            && feature.sources.contains(&source.id)
            && feature.accepts(&feature_write.value);
        if !fits {
            return Err(Reasons::of(ReasonCode::SchemaViolation));
        }

        let facts = ValueFacts {
            source,
            interaction_time: row.provenance.interaction_time,
            microphone_permission: row.provenance.microphone_permission_granted,
            origin_app: &row.provenance.origin_app,
            sensitivity: class.sensitivity,
            topic_value: class.is_topic_value,
            topic_confidence: feature_write
                .topic
                .as_ref()
                .and_then(|topic| topic.confidence),
        };
        let reasons = policy.decide(&policy.input(&facts, state, surface, now));
        if !reasons.is_empty() {
            return Err(reasons);
        }
        let ttl = feature_write
            .ttl
            .map_or(feature.ttl, |requested| requested.min(feature.ttl));
        Ok(StoredValue {
            feature: feature.id,
            event_time: facts.interaction_time,
            write_time: now,
            expires_at: now
                .saturating_add(ttl)
                .min(policy.retention_end(&facts, surface.purpose)),
            source: source.id,
            sensitivity: facts.sensitivity,
            policy_version: policy.hash_prefix,
            origin_app: row.provenance.origin_app.clone(),
            topic_id: feature_write
                .topic
                .as_ref()
                .map_or_else(String::new, |topic| topic.id.clone()),
            microphone_permission: facts.microphone_permission,
            topic_confidence: facts.topic_confidence,
            value: feature_write.value.clone(),
        })
    }
}

/// The indices of the request's rows for `user_id`, in request order.
fn rows_of(request: &WriteRequest, user_id: u64) -> Vec<usize> {
    (0..request.rows.len())
        .filter(|&index| request.rows[index].user_id == user_id)
        .collect()
}

/// The results of the request's rows at `indices`, from the decisions and the storage
/// outcomes (`None` for a dry run: admitted values are reported ADMITTED).
fn answer_rows(
    request: &WriteRequest,
    plan: &Plan,
    indices: &[usize],
    outcomes: Option<&Outcomes>,
) -> Vec<proto::RowResult> {
    indices
        .iter()
        .map(|&index| {
            let row = &request.rows[index];
            proto::RowResult {
                verdicts: row
                    .features
                    .iter()
                    .zip(&plan.decisions[index])
                    .map(|(feature, surface_decisions)| {
                        verdict(
                            &feature.name,
                            &row.target_surfaces,
                            surface_decisions,
                            plan,
                            outcomes,
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

/// The response to a write from what the store did with each user's share: the answer
/// built now for a share applied now, the answer stored then for a share replayed.
fn compose(
    request: &WriteRequest,
    plan: &Plan,
    applied: &[Applied],
    outcomes: &Outcomes,
    policy: &Policy,
) -> Result<proto::WriteFeaturesResponse, Error> {
    let all = (0..request.rows.len()).collect::<Vec<_>>();
    let mut rows = answer_rows(request, plan, &all, Some(outcomes));
    let mut replayed = 0;
    let mut stored_hash = None;
    for (share, applied) in plan.shares.iter().zip(applied) {
        let Applied::Replayed { answer } = applied else {
            continue;
        };
        let fragment = proto::WriteFeaturesResponse::decode(answer.as_slice())
            .map_err(|error| Error::CorruptReplay(error.to_string()))?;
        let indices = rows_of(request, share.user_id);
        if fragment.rows.len() != indices.len() {
            return Err(Error::CorruptReplay(format!(
                "the stored answer for user {} has {} rows, the request {}",
                share.user_id,
                fragment.rows.len(),
                indices.len()
            )));
        }
        for (index, row) in indices.into_iter().zip(fragment.rows) {
            rows[index] = row;
        }
        stored_hash.get_or_insert(fragment.policy_bundle_hash);
        replayed += 1;
    }
    let replayed = replayed == plan.shares.len();
    Ok(proto::WriteFeaturesResponse {
        rows,
        replayed,
        policy_bundle_hash: match stored_hash {
            Some(hash) if replayed => hash,
            _ => policy.hash.clone(),
        },
    })
}

fn verdict(
    feature: &str,
    target_surfaces: &[String],
    decisions: &[Decision],
    plan: &Plan,
    outcomes: Option<&Outcomes>,
) -> proto::FeatureVerdict {
    let mut reasons = Reasons::NONE;
    let mut admitted = 0;
    let mut expires_at = 0;
    let surfaces = target_surfaces
        .iter()
        .zip(decisions)
        .map(|(surface, decision)| match decision {
            Decision::Admitted(placement) => {
                admitted += 1;
                expires_at = expires_at.max(plan.value(*placement).expires_at.unix_micros());
                let (share, row) = plan.placed[placement.write];
                let outcome = match outcomes
                    .and_then(|outcomes| outcomes[share].as_ref())
                    .map(|share_outcomes| share_outcomes[row][placement.value])
                {
                    Some(ValueOutcome::Stored) => proto::Outcome::Stored,
                    Some(ValueOutcome::Superseded) => proto::Outcome::Superseded,
                    None => proto::Outcome::Admitted,
                };
                proto::SurfaceOutcome {
                    surface: surface.clone(),
                    outcome: outcome as i32,
                    reasons: Vec::new(),
                }
            }
            Decision::Refused(refusals) => {
                reasons = reasons.union(*refusals);
                proto::SurfaceOutcome {
                    surface: surface.clone(),
                    outcome: proto::Outcome::Refused as i32,
                    reasons: refusals.iter().map(|reason| reason as i32).collect(),
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
        reasons: reasons.iter().map(|reason| reason as i32).collect(),
        surfaces,
        expires_at_unix_micros: expires_at,
    }
}
