//! The node's log: `pretty` lines for people (coloured only on a terminal) or `json`
//! objects for log pipelines, on stderr, filtered by `log_level` (or `RUST_LOG`). Every
//! line carries the node id (a background task has no span to inherit it from, so the
//! formatter adds it), and the fields of the spans it happens in: `request_id` for API
//! requests, `run_id`, `dag_id`, `task_id` and `attempt` for an attempt's execution.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Install the global subscriber (a second call in the same process is ignored).
pub fn init(level: &str, format: LogFormat, node: u64) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},openraft=warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a log redirected to a file or a pipe
        // keeps plain text (and `NO_COLOR` turns it off everywhere).
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
    let _ = match format {
        LogFormat::Pretty => builder.with_timer(NodeTimer { node }).try_init(),
        LogFormat::Json => builder
            .json()
            .event_format(JsonWithNode {
                inner: format::Format::default()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true),
                node,
            })
            .try_init(),
    };
}

/// The pretty format's timestamp followed by `node=N`.
struct NodeTimer {
    node: u64,
}

impl FormatTime for NodeTimer {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        SystemTime.format_time(w)?;
        write!(w, " node={}", self.node)
    }
}

/// tracing-subscriber's JSON lines with `"node":N` as their first key.
struct JsonWithNode<F> {
    inner: F,
    node: u64,
}

impl<S, N, F> FormatEvent<S, N> for JsonWithNode<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // An event that names its node already (`node = id`) keeps its own key: no
        // duplicate keys in a line.
        let has_node = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&line)
            .is_ok_and(|m| m.contains_key("node"));
        match line.strip_prefix('{') {
            Some(_) if has_node => writer.write_str(&line),
            Some(rest) if rest.starts_with('}') => write!(writer, "{{\"node\":{}{rest}", self.node),
            Some(rest) => write!(writer, "{{\"node\":{},{rest}", self.node),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_the_node_and_the_span_fields() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .json()
            .event_format(JsonWithNode {
                inner: format::Format::default()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(true),
                node: 7,
            })
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("attempt", run_id = "r1", task_id = "t1", attempt = 2);
            let _g = span.enter();
            tracing::info!(dag_id = "d1", "attempt ended");
            tracing::info!(node = 7, "names its node itself");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["node"], 7);
        assert_eq!(line["dag_id"], "d1");
        assert_eq!(line["message"], "attempt ended");
        assert_eq!(line["span"]["run_id"], "r1");
        assert_eq!(line["span"]["attempt"], 2);
        assert_eq!(
            lines[1].matches("\"node\":").count(),
            1,
            "no duplicate node key: {}",
            lines[1]
        );
    }

    #[test]
    fn pretty_lines_carry_the_node() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buf.clone())
            .with_ansi(false)
            .with_timer(NodeTimer { node: 3 })
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::info!("hello"));
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(out.contains(" node=3 ") && out.contains("hello"), "{out}");
    }
}
