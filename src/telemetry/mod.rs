//! What a node tells its operators besides the API: Prometheus metrics ([`metrics`]:
//! every metric name, its buckets and the recorder behind `/metrics`) and the log format
//! ([`logging`]: pretty or JSON lines, each tagged with the node id).

pub mod logging;
pub mod metrics;
