//! Usage ledger views: `GET /v1/usage` as JSON and its CSV export as records.

use serde_json::Value;

use crate::TestServer;

/// The columns of the usage CSV export, in order.
pub const USAGE_COLUMNS: [&str; 21] = [
    "request_id",
    "tenant",
    "function",
    "version",
    "start",
    "start_ms",
    "wall_us",
    "cpu_us",
    "memory_peak_bytes",
    "mem_mib_ms",
    "inference_cpu_us",
    "inference_gpu_us",
    "bytes_in",
    "bytes_out",
    "cold",
    "cache",
    "outcome",
    "status",
    "cost",
    "batch_rows",
    "prediction",
];

/// One usage record (a CSV line) by column.
#[derive(Debug)]
pub struct Record(pub std::collections::BTreeMap<String, String>);

impl Record {
    pub fn get(&self, column: &str) -> &str {
        self.0
            .get(column)
            .unwrap_or_else(|| panic!("no column {column}"))
    }

    pub fn num(&self, column: &str) -> u64 {
        self.get(column)
            .parse()
            .unwrap_or_else(|_| panic!("{column} is not a whole number: {self:?}"))
    }
}

/// Parses the usage CSV, asserting its header.
pub fn parse_csv(text: &str) -> Vec<Record> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    assert_eq!(header, USAGE_COLUMNS, "CSV header of:\n{text}");
    lines
        .filter(|l| !l.is_empty())
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(cells.len(), USAGE_COLUMNS.len(), "{line}");
            Record(
                USAGE_COLUMNS
                    .iter()
                    .zip(cells)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        })
        .collect()
}

/// `GET /v1/usage?{query}` as JSON.
pub fn usage(server: &TestServer, query: &str) -> Value {
    let a = server.get(&format!("/v1/usage?{query}"));
    assert_eq!(a.status, 200, "{query}: {}", a.text());
    a.json()
}

/// `GET /v1/usage?format=csv{query}` as records.
pub fn usage_csv(server: &TestServer, query: &str) -> Vec<Record> {
    let a = server.get(&format!("/v1/usage?format=csv{query}"));
    assert_eq!(a.status, 200, "{query}: {}", a.text());
    let content_type = a.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    parse_csv(&a.text())
}
