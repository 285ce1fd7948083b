//! The operator CLI (`featurestore`): lists the registry, writes features from JSON,
//! bulk-loads and generates backfill files, runs the privacy and admin calls, and reads
//! features as a table or JSON. Lives in the library so that tests drive it in-process
//! against a real server.

mod admin;
mod bench;
mod data;
mod json;
mod loads;
mod privacy;
mod table;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::path::PathBuf;

use crate::generate::{GenerateOptions, generate};
use crate::load::formats::FileFormat;
use crate::load::{LoadOptions, load};
use crate::{Client, ClientOptions};
use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand, ValueEnum};
use featurestore::domain::{AgeBand, ReadKey, ReadRequest, UserStateUpdate};
use featurestore::proto;
use serde_json::{Map, Value as Json, json};

use json::*;
use table::*;

/// Operator CLI of the feature store.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Args {
    /// Server address.
    #[arg(
        long,
        env = "FEATURESTORE_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    endpoint: String,
    /// Deadline of each call, e.g. 500ms or 5s.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Bearer token of the caller's principal.
    #[arg(
        long,
        env = "FEATURESTORE_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Certificate authority (PEM) that signed the server's certificate; needed for an
    /// https:// endpoint.
    #[arg(long, env = "FEATURESTORE_TLS_CA", global = true)]
    tls_ca: Option<std::path::PathBuf>,
    /// The client's certificate (PEM), for mutual TLS; with --tls-key.
    #[arg(
        long,
        env = "FEATURESTORE_TLS_CERT",
        global = true,
        requires = "tls_key"
    )]
    tls_cert: Option<std::path::PathBuf>,
    /// The client's private key (PEM), for mutual TLS; with --tls-cert.
    #[arg(
        long,
        env = "FEATURESTORE_TLS_KEY",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must hold, when not the endpoint's host.
    #[arg(long, env = "FEATURESTORE_TLS_DOMAIN", global = true)]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Data(data::DataCommand),
    #[command(flatten)]
    Privacy(privacy::PrivacyCommand),
    #[command(flatten)]
    Loads(loads::LoadsCommand),
    #[command(flatten)]
    Admin(admin::AdminCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AgeArg {
    Unknown,
    Minor,
    Adult,
}

impl From<AgeArg> for AgeBand {
    fn from(age: AgeArg) -> Self {
        match age {
            AgeArg::Unknown => AgeBand::Unknown,
            AgeArg::Minor => AgeBand::Minor,
            AgeArg::Adult => AgeBand::Adult,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

/// Exit status when every call succeeded and nothing was refused.
pub const EXIT_SUCCESS: u8 = 0;
/// Exit status when the command failed (the error is returned).
pub const EXIT_FAILURE: u8 = 1;
/// Exit status of `write` when any value was refused on some surface.
pub const EXIT_REFUSED: u8 = 3;
/// Exit status of `verify-audit` when the audit log's chain is broken.
pub const EXIT_AUDIT_BROKEN: u8 = 4;

/// Runs one CLI command, printing its answer to `out`; returns the exit status.
pub async fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let tls = if args.tls_ca.is_some() || args.tls_cert.is_some() {
        Some(crate::ClientTls::from_files(
            args.tls_ca.as_deref(),
            args.tls_cert.as_deref().zip(args.tls_key.as_deref()),
            args.tls_domain.clone(),
        )?)
    } else {
        None
    };
    let options = ClientOptions {
        timeout: args.timeout,
        token: args.token.clone().map(crate::BearerToken),
        tls,
        ..ClientOptions::default()
    };
    let client = Client::connect(&args.endpoint, options)?;
    let call = |error: crate::ClientError| {
        let request = error
            .request_id()
            .map(|id| format!(", request id {id}"))
            .unwrap_or_default();
        match error.policy_refusal() {
            Some(refusal) => anyhow!(
                "{error} (the user's state is at generation {}; server {}{request})",
                refusal.current_generation,
                args.endpoint
            ),
            None => anyhow!("{error} (server {}{request})", args.endpoint),
        }
    };
    match args.command {
        Command::Data(command) => data::run(command, &client, &call, out).await,
        Command::Privacy(command) => privacy::run(command, &client, &call, out).await,
        Command::Loads(command) => loads::run(command, &client, &call, out).await,
        Command::Admin(command) => admin::run(command, &client, &call, out).await,
    }
}
