//! How client commands print: aligned tables for people, JSON or YAML for scripts;
//! colour only when stdout is a terminal (and `NO_COLOR` is unset); relative times.

use std::io::IsTerminal;

use chrono::{DateTime, Utc};
use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{Cell, Color, ContentArrangement, Table};
use serde_json::Value;

/// `--output`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Print `value` as JSON or YAML, or call `table` for the table form.
pub fn emit(format: Format, value: &Value, table: impl FnOnce(&Value)) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml => print!("{}", serde_yaml_ng::to_string(value)?),
        Format::Table => table(value),
    }
    Ok(())
}

/// As [`emit`] for a list: in a table, `none` (e.g. "no DAGs") instead of an empty table.
pub fn emit_list(
    format: Format,
    value: &Value,
    none: &str,
    table: impl FnOnce(&Value),
) -> anyhow::Result<()> {
    emit(format, value, |v| {
        if v.as_array().is_none_or(Vec::is_empty) {
            println!("{none}");
        } else {
            table(v)
        }
    })
}

/// A table with a header row, aligned, without colour codes when not on a TTY.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    if !colour() {
        t.force_no_tty();
    }
    // A terminal that reports no width (`script`, some `docker exec -t` and CI runners)
    // would get a column per character: lay the table out as if off a terminal.
    if t.width().is_some_and(|w| w < 20) {
        t.set_content_arrangement(ContentArrangement::Disabled);
    }
    t
}

/// Whether stdout wants ANSI colour.
pub fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// A run or task state, coloured on a TTY (green done, red failed, yellow in progress).
pub fn state(s: &str) -> String {
    if !colour() {
        return s.to_string();
    }
    let Some(code) = colour_of(s) else {
        return s.to_string();
    };
    format!("\x1b[{code}m{s}\x1b[0m")
}

/// A state as a table cell, coloured like [`state`] (the table drops colour off a TTY,
/// and measures the cell without escape codes).
pub fn state_cell(s: &str) -> Cell {
    labelled_state_cell(s, s)
}

/// A cell saying `label`, coloured as `state` is.
pub fn labelled_state_cell(state: &str, label: &str) -> Cell {
    let cell = Cell::new(label);
    match colour_of(state) {
        Some("32") => cell.fg(Color::Green),
        Some("31") => cell.fg(Color::Red),
        Some("33") => cell.fg(Color::Yellow),
        _ => cell,
    }
}

fn colour_of(s: &str) -> Option<&'static str> {
    match s {
        "done" | "active" | "ok" | "ready" | "leader" => Some("32"),
        "failed" | "upstream_failed" | "cancelled" | "down" | "not ready" | "deleted" => Some("31"),
        "running" | "retrying" | "queued" | "paused" | "would create" | "would update"
        | "updated" | "created" => Some("33"),
        _ => None,
    }
}

/// A JSON scalar as table text: strings bare, null as "-".
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An RFC 3339 instant as "3 min ago" / "in 2 h", or "-".
pub fn ago(v: &Value) -> String {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| relative(t.with_timezone(&Utc), Utc::now()))
        .unwrap_or_else(|| "-".into())
}

/// `t` relative to `now`, in the largest whole unit.
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (n, future) = (secs.unsigned_abs(), secs < 0);
    let amount = match n {
        0..=4 => return "just now".into(),
        5..=59 => format!("{n} s"),
        60..=3599 => format!("{} min", n / 60),
        3600..=86_399 => format!("{} h", n / 3600),
        _ => format!("{} d", n / 86_400),
    };
    if future {
        format!("in {amount}")
    } else {
        format!("{amount} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn relative_times_read_naturally() {
        let now = Utc.with_ymd_and_hms(2025, 10, 1, 12, 0, 0).unwrap();
        let at = |s| now - chrono::Duration::seconds(s);
        assert_eq!(relative(at(2), now), "just now");
        assert_eq!(relative(at(30), now), "30 s ago");
        assert_eq!(relative(at(185), now), "3 min ago");
        assert_eq!(relative(at(7300), now), "2 h ago");
        assert_eq!(relative(at(-3 * 86_400), now), "in 3 d");
    }
}
