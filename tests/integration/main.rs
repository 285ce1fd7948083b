//! End-to-end tests: every test starts the real server on a loopback port and talks to it
//! through the real client.

mod audit;
mod bad_input;
mod bulk_load;
mod cli;
mod erasure;
mod lifecycle;
mod policy;
mod policy_changes;
mod read_instructions;
mod read_write;
mod retention;

use clap::Parser;
use featurestore::proto::{self, GetFeaturesResponse, ValueStatus};
use featurestore_client::cli::Args;
use featurestore_tests::TestServer;

/// Runs `featurestore <arguments>` in-process against `server`; returns the exit status and
/// output.
async fn featurestore(server: &TestServer, arguments: &[&str]) -> anyhow::Result<(u8, String)> {
    let mut command = vec!["featurestore", "--endpoint", server.endpoint.as_str()];
    command.extend_from_slice(arguments);
    let args = Args::try_parse_from(command)?;
    let mut out = Vec::new();
    let code = featurestore_client::cli::run(args, &mut out).await?;
    Ok((code, String::from_utf8(out)?))
}

/// The status of `feature` in row `row` of a read response.
fn status(response: &GetFeaturesResponse, row: usize, feature: &str) -> ValueStatus {
    let column = column_index(response, feature);
    ValueStatus::try_from(response.rows[row].statuses[column]).expect("a known value status")
}

/// The float value of `feature` in row `row`.
fn float(response: &GetFeaturesResponse, row: usize, feature: &str) -> f32 {
    let column = &response.columns[column_index(response, feature)];
    response.rows[row].float_values[column.offset as usize]
}

fn column_index(response: &GetFeaturesResponse, feature: &str) -> usize {
    response
        .columns
        .iter()
        .position(|column| column.name == feature)
        .unwrap_or_else(|| panic!("no column {feature} in {:?}", response.columns))
}

/// Verdict of the feature at `feature` of row `row` of a write response.
fn verdict(
    response: &proto::WriteFeaturesResponse,
    row: usize,
    feature: usize,
) -> &proto::FeatureVerdict {
    &response.rows[row].verdicts[feature]
}

fn outcomes(verdict: &proto::FeatureVerdict) -> Vec<(String, proto::Outcome)> {
    verdict
        .surfaces
        .iter()
        .map(|surface| {
            (
                surface.surface.clone(),
                proto::Outcome::try_from(surface.outcome).expect("a known outcome"),
            )
        })
        .collect()
}
