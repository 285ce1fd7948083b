//! The privacy commands: users' states, audit trails, erasure and its receipts.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum PrivacyCommand {
    /// Create or replace a user's state (privacy role); prints the new state.
    SetUser(SetUserArgs),
    /// Show a user's state (privacy role).
    GetUser { user_id: u64 },
    /// Show a user's audit trail (privacy role).
    Audit(AuditArgs),
    /// Erase a user (privacy role) and print the receipt.
    Erase { user_id: u64 },
    /// Show an erasure's receipt (privacy role).
    ErasureStatus { receipt_id: String },
}

/// Runs one of these commands.
pub(super) async fn run(
    command: PrivacyCommand,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    match command {
        PrivacyCommand::SetUser(args) => set_user(args, client, call, out).await,
        PrivacyCommand::GetUser { user_id } => {
            let state = client.get_user_state(user_id).await.map_err(call)?;
            print_user_state(out, &state)?;
            Ok(EXIT_SUCCESS)
        }
        PrivacyCommand::Audit(args) => audit(args, client, call, out).await,
        PrivacyCommand::Erase { user_id } => {
            let receipt = client.erase_user(user_id).await.map_err(call)?;
            print_receipt(out, &receipt)?;
            Ok(EXIT_SUCCESS)
        }
        PrivacyCommand::ErasureStatus { receipt_id } => {
            let receipt = client.erasure_status(&receipt_id).await.map_err(call)?;
            print_receipt(out, &receipt)?;
            Ok(EXIT_SUCCESS)
        }
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct SetUserArgs {
    pub(super) user_id: u64,
    /// ISO 3166 code such as DE, GB, KR, US or US-CA; empty for unknown.
    #[arg(long, default_value = "")]
    pub(super) jurisdiction: String,
    #[arg(long, value_enum)]
    pub(super) age: AgeArg,
    /// Apps whose accounts are linked, e.g. facebook,instagram.
    #[arg(long = "linked", value_delimiter = ',')]
    pub(super) linked_apps: Vec<String>,
    /// The user objected to ad personalization.
    #[arg(long)]
    pub(super) ads_objection: bool,
    /// Apply only if the state is still at this generation.
    #[arg(long)]
    pub(super) expected_generation: Option<u64>,
}

#[derive(Debug, clap::Args)]
pub(super) struct AuditArgs {
    pub(super) user_id: u64,
    /// Most records to show.
    #[arg(long, default_value_t = 100)]
    pub(super) limit: u32,
}

async fn set_user(
    args: SetUserArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let SetUserArgs {
        user_id,
        jurisdiction,
        age,
        linked_apps,
        ads_objection,
        expected_generation,
    } = args;
    let state = client
        .set_user_state(UserStateUpdate {
            user_id,
            jurisdiction,
            age_band: age.into(),
            linked_apps,
            ads_objection,
            expected_generation,
        })
        .await
        .map_err(call)?;
    print_user_state(out, &state)?;
    Ok(EXIT_SUCCESS)
}

async fn audit(
    args: AuditArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let AuditArgs { user_id, limit } = args;
    let trail = client.audit_trail(user_id, limit).await.map_err(call)?;
    writeln!(
        out,
        "user {user_id} is {} in the audit log",
        trail.user_pseudonym
    )?;
    let rows = trail
        .records
        .iter()
        .map(|record| {
            let reasons = record
                .reasons
                .iter()
                .map(|&reason| reason_label(reason))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                format!("{}/{}", record.partition, record.sequence),
                format_time(record.time_unix_micros),
                record.action.clone(),
                record.caller.clone(),
                record.subject.clone(),
                record.surfaces.join(","),
                reasons,
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        out,
        &[
            "chain/seq",
            "time",
            "action",
            "caller",
            "subject",
            "surfaces",
            "reasons",
        ],
        &rows,
    )?;
    Ok(EXIT_SUCCESS)
}

pub(super) fn print_receipt(
    out: &mut dyn Write,
    receipt: &proto::ErasureReceipt,
) -> std::io::Result<()> {
    let mut rows = vec![
        vec!["receipt".to_string(), receipt.receipt_id.clone()],
        vec!["user".to_string(), receipt.user_id.to_string()],
        vec![
            "requested".to_string(),
            format_time_micros(receipt.requested_at_unix_micros),
        ],
        vec![
            "fenced".to_string(),
            format_time_micros(receipt.fenced_at_unix_micros),
        ],
        vec![
            "deleted".to_string(),
            format_time_micros(receipt.deleted_at_unix_micros),
        ],
        vec![
            "compacted".to_string(),
            format_time_micros(receipt.compacted_at_unix_micros),
        ],
        vec![
            "verified".to_string(),
            format_time_micros(receipt.verified_at_unix_micros),
        ],
        vec![
            "result".to_string(),
            if receipt.verified {
                "nothing left".to_string()
            } else {
                "NOT VERIFIED".to_string()
            },
        ],
    ];
    for reapplied in &receipt.reapplied_at_unix_micros {
        rows.push(vec![
            "reapplied".to_string(),
            format_time_micros(*reapplied),
        ]);
    }
    print_table(out, &["step", "finished"], &rows)
}

/// A time with its microseconds, for steps that finish within a second of each other.
pub(super) fn format_time_micros(micros: i64) -> String {
    match u64::try_from(micros) {
        Ok(micros) if micros > 0 => {
            humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
        }
        _ => "-".to_string(),
    }
}

pub(super) fn print_user_state(
    out: &mut dyn Write,
    state: &proto::UserState,
) -> std::io::Result<()> {
    let age = proto::AgeBand::try_from(state.age_band).map_or("?".to_string(), |band| {
        enum_name(band.as_str_name(), "AGE_BAND_")
    });
    let erasure = proto::ErasureState::try_from(state.erasure_state)
        .map_or("?".to_string(), |erasure| {
            enum_name(erasure.as_str_name(), "ERASURE_STATE_")
        });
    let jurisdiction = if state.jurisdiction.is_empty() {
        "(unknown)"
    } else {
        &state.jurisdiction
    };
    let rows = vec![
        vec!["user".to_string(), state.user_id.to_string()],
        vec![
            "jurisdiction".to_string(),
            format!("{jurisdiction} ({})", state.jurisdiction_group),
        ],
        vec!["age_band".to_string(), age],
        vec!["linked_apps".to_string(), state.linked_apps.join(",")],
        vec!["ads_objection".to_string(), state.ads_objection.to_string()],
        vec!["erasure".to_string(), erasure],
        vec!["generation".to_string(), state.generation.to_string()],
        vec![
            "updated_at".to_string(),
            format_time(state.updated_at_unix_micros),
        ],
    ];
    print_table(out, &["field", "value"], &rows)
}
