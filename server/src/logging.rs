//! Log output: human-readable text, or JSON lines for log pipelines. `RUST_LOG` chooses
//! what is logged (default `info`); each call's lines carry its `request` span (request id
//! and method), and at `debug` the spans of its stages (`parse`, `read_rows`, `policy`,
//! `storage`) are logged as they close, with their time.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, for people.
    Text,
    /// One JSON object per event, with the fields of the event and of its spans.
    Json,
}

/// Installs the process's logger, writing to standard error.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Spans are logged as they close, with their time, only when debugging: at `info` a
    // line per request would drown everything else.
    let span_events = if filter
        .max_level_hint()
        .is_some_and(|level| level >= tracing::level_filters::LevelFilter::DEBUG)
    {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    // Colors only for a person at a terminal: escape codes have no place in a log file, and
    // writing them costs every request (its span's fields are formatted when it opens).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(span_events);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .init(),
    }
}
