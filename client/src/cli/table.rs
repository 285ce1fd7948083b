//! How the commands print: tables, times, reason codes and enum names.

use super::*;

pub(super) fn enum_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

pub(super) fn format_time(micros: i64) -> String {
    let Ok(micros) = u64::try_from(micros) else {
        return "-".to_string();
    };
    if micros == 0 {
        return "-".to_string();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(micros)).to_string()
}

/// A reason code's name without its prefix, e.g. "USER_ERASED".
pub(super) fn reason_label(reason: i32) -> String {
    proto::ReasonCode::try_from(reason).map_or_else(
        |_| format!("reason {reason}"),
        |reason| {
            reason
                .as_str_name()
                .trim_start_matches("REASON_CODE_")
                .to_string()
        },
    )
}

pub(super) fn print_table<S: AsRef<str>>(
    out: &mut dyn Write,
    header: &[S],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|title| title.as_ref().len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.iter().map(AsRef::as_ref).collect()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}
