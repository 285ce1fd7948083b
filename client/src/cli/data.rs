//! The data-plane commands: list the registry, write and explain rows from JSON, read
//! features as a table or JSON.

use super::*;

#[derive(Debug, Subcommand)]
pub(super) enum DataCommand {
    /// List the registered features.
    Features,
    /// List the registered surfaces.
    Surfaces,
    /// Write feature rows from a JSON file (or standard input); see docs/operations.md for
    /// the format. Exits with 3 when any value was refused.
    Write {
        /// JSON file; standard input when absent or "-".
        file: Option<String>,
    },
    /// Decide a write from a JSON file without storing it: the verdicts, the rules that
    /// fired on each surface, and the policy bundle that decided. Exits with 3 when any
    /// value would be refused.
    Explain(ExplainArgs),
    /// Read features for (user, surface) keys.
    Read(ReadArgs),
    /// Send the same shape of read again and again (random users, one surface) and print
    /// requests/s, keys/s and latency percentiles.
    BenchRead(super::bench::BenchReadArgs),
}

/// Runs one of these commands.
pub(super) async fn run(
    command: DataCommand,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    match command {
        DataCommand::Features => features(client, call, out).await,
        DataCommand::Surfaces => surfaces(client, call, out).await,
        DataCommand::Write { file } => {
            let text = read_input(file.as_deref())?;
            let features = client.list_features().await.map_err(call)?;
            let request = write_request_from_json(&text, &features)?;
            let response = client
                .write_features_raw(request.clone())
                .await
                .map_err(call)?;
            Ok(print_write(out, &request, &response)?)
        }
        DataCommand::Explain(args) => explain(args, client, call, out).await,
        DataCommand::Read(args) => read(args, client, call, out).await,
        DataCommand::BenchRead(args) => super::bench::bench_read(args, client, call, out).await,
    }
}

#[derive(Debug, clap::Args)]
pub(super) struct ExplainArgs {
    /// JSON file; standard input when absent or "-".
    pub(super) file: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(super) struct ReadArgs {
    /// Surface of every --user.
    #[arg(long)]
    pub(super) surface: Option<String>,
    /// User ids to read on --surface.
    #[arg(long = "user", value_delimiter = ',')]
    pub(super) users: Vec<u64>,
    /// Explicit keys as USER:SURFACE.
    #[arg(long = "key")]
    pub(super) keys: Vec<String>,
    /// Features to return (all of the surfaces' features when absent).
    #[arg(long = "feature", value_delimiter = ',')]
    pub(super) features: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub(super) format: Format,
}

async fn features(
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let features = client.list_features().await.map_err(call)?;
    let rows = features
        .iter()
        .map(|feature| {
            vec![
                feature.name.clone(),
                type_name(feature.value_type, feature.dimension),
                feature.sources.join(","),
                sensitivity_name(feature.sensitivity),
                format_ttl(feature.ttl_seconds),
                feature.surfaces.join(","),
            ]
        })
        .collect::<Vec<_>>();
    print_table(
        out,
        &[
            "feature",
            "type",
            "sources",
            "sensitivity",
            "ttl",
            "surfaces",
        ],
        &rows,
    )?;
    Ok(EXIT_SUCCESS)
}

async fn surfaces(
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let surfaces = client.list_surfaces().await.map_err(call)?;
    let rows = surfaces
        .iter()
        .map(|surface| {
            let purpose =
                proto::Purpose::try_from(surface.purpose).map_or("?", |purpose| match purpose {
                    proto::Purpose::Content => "content",
                    proto::Purpose::Ads => "ads",
                    proto::Purpose::Unspecified => "?",
                });
            vec![
                surface.name.clone(),
                surface.app.clone(),
                purpose.to_string(),
                surface.description.clone(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(out, &["surface", "app", "purpose", "description"], &rows)?;
    Ok(EXIT_SUCCESS)
}

async fn explain(
    args: ExplainArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let ExplainArgs { file } = args;
    let text = read_input(file.as_deref())?;
    let features = client.list_features().await.map_err(call)?;
    let request = write_request_from_json(&text, &features)?;
    let response = client
        .explain_write_raw(request.clone())
        .await
        .map_err(call)?;
    writeln!(out, "policy bundle {}", response.policy_bundle_hash)?;
    match response.verdicts {
        Some(verdicts) => Ok(print_write(out, &request, &verdicts)?),
        None => {
            let reason = proto::ReasonCode::try_from(response.request_refusal)
                .map_or("?", |reason| {
                    reason.as_str_name().trim_start_matches("REASON_CODE_")
                });
            writeln!(
                out,
                "the whole request would be refused: {reason} (rows[{}])",
                response.refused_row
            )?;
            Ok(EXIT_REFUSED)
        }
    }
}

async fn read(
    args: ReadArgs,
    client: &Client,
    call: &dyn Fn(crate::ClientError) -> anyhow::Error,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let ReadArgs {
        surface,
        users,
        keys,
        features,
        format,
    } = args;
    let mut read_keys = Vec::new();
    if !users.is_empty() {
        let surface = surface.context("--user needs --surface")?;
        read_keys.extend(users.iter().map(|&user_id| ReadKey {
            user_id,
            surface: surface.clone(),
        }));
    }
    for key in &keys {
        let (user, surface) = key
            .split_once(':')
            .with_context(|| format!("--key {key:?} is not USER:SURFACE"))?;
        let user_id = user
            .parse()
            .with_context(|| format!("--key {key:?}: {user:?} is not a user id"))?;
        read_keys.push(ReadKey {
            user_id,
            surface: surface.to_string(),
        });
    }
    if read_keys.is_empty() {
        bail!("nothing to read: give --surface with --user, or --key USER:SURFACE");
    }
    let request = ReadRequest {
        keys: read_keys.clone(),
        features,
        include_event_times: true,
    };
    let response = client.get_features(request).await.map_err(call)?;
    let rows = read_rows_json(&read_keys, &response);
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?,
        Format::Table => print_read_table(out, &response, &rows)?,
    }
    Ok(EXIT_SUCCESS)
}

/// The text of `file`, or of standard input when it is absent or "-".
pub(super) fn read_input(file: Option<&str>) -> anyhow::Result<String> {
    match file {
        None | Some("-") => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read standard input")?;
            Ok(text)
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}")),
    }
}

pub(super) fn type_name(value_type: i32, dimension: u32) -> String {
    match proto::ValueType::try_from(value_type) {
        Ok(proto::ValueType::Float) => "float".to_string(),
        Ok(proto::ValueType::Int64) => "int64".to_string(),
        Ok(proto::ValueType::String) => "string".to_string(),
        Ok(proto::ValueType::FloatVector) => format!("float_vector[{dimension}]"),
        Ok(proto::ValueType::Sparse) => "sparse".to_string(),
        Ok(proto::ValueType::Unspecified) | Err(_) => "?".to_string(),
    }
}

pub(super) fn sensitivity_name(sensitivity: i32) -> String {
    proto::SensitivityClass::try_from(sensitivity)
        .map(|class| {
            class
                .as_str_name()
                .trim_start_matches("SENSITIVITY_CLASS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "?".to_string())
}

/// A TTL in whole days when it is one, else as humantime prints it.
pub(super) fn format_ttl(seconds: u64) -> String {
    const DAY: u64 = 24 * 60 * 60;
    if seconds > 0 && seconds.is_multiple_of(DAY) {
        format!("{}d", seconds / DAY)
    } else {
        humantime::format_duration(Duration::from_secs(seconds)).to_string()
    }
}

/// Prints one line per (row, feature) and returns 3 when any value was refused.
pub(super) fn print_write(
    out: &mut dyn Write,
    request: &proto::WriteFeaturesRequest,
    response: &proto::WriteFeaturesResponse,
) -> std::io::Result<u8> {
    let mut refused = false;
    let mut lines = Vec::new();
    for (row, result) in request.rows.iter().zip(&response.rows) {
        for verdict in &result.verdicts {
            let verdict_name = proto::Verdict::try_from(verdict.verdict)
                .map_or("?".to_string(), |verdict| {
                    enum_name(verdict.as_str_name(), "VERDICT_")
                });
            refused |= verdict.verdict != proto::Verdict::Allow as i32;
            let surfaces = verdict
                .surfaces
                .iter()
                .map(|surface| {
                    let outcome = proto::Outcome::try_from(surface.outcome)
                        .map_or("?".to_string(), |outcome| {
                            enum_name(outcome.as_str_name(), "OUTCOME_")
                        });
                    let reasons = surface
                        .reasons
                        .iter()
                        .map(|&reason| reason_label(reason))
                        .collect::<Vec<_>>();
                    if reasons.is_empty() {
                        format!("{}={outcome}", surface.surface)
                    } else {
                        format!("{}={outcome}({})", surface.surface, reasons.join(","))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            lines.push(vec![
                row.user_id.to_string(),
                verdict.feature.clone(),
                verdict_name,
                format_time(verdict.expires_at_unix_micros),
                surfaces,
            ]);
        }
    }
    if response.replayed {
        writeln!(
            out,
            "replayed: a write with this idempotency key was already applied; nothing changed"
        )?;
    }
    print_table(
        out,
        &["user", "feature", "verdict", "expires_at", "surfaces"],
        &lines,
    )?;
    Ok(if refused { EXIT_REFUSED } else { EXIT_SUCCESS })
}

pub(super) fn print_read_table(
    out: &mut dyn Write,
    response: &proto::GetFeaturesResponse,
    rows: &[Json],
) -> std::io::Result<()> {
    let mut header = vec!["user", "surface", "row"];
    header.extend(response.columns.iter().map(|column| column.name.as_str()));
    let lines = rows
        .iter()
        .map(|row| {
            let mut line = vec![
                row["user_id"].to_string(),
                row["surface"].as_str().unwrap_or("").to_string(),
            ];
            line.push(row["status"].as_str().unwrap_or("").to_string());
            for column in &response.columns {
                let cell = &row["features"][&column.name];
                let status = cell["status"].as_str().unwrap_or("");
                line.push(match cell.get("value") {
                    Some(value) if status == "present" => value.to_string(),
                    Some(value) => format!("{value} ({status})"),
                    None => format!("({status})"),
                });
            }
            line
        })
        .collect::<Vec<_>>();
    print_table(out, &header, &lines)
}
