//! The coverage report: one serialisable struct, rendered as a terminal table, JSON, CSV (the
//! instruction table) or a self-contained HTML page with SVG charts.
//!
//! JSON keys scripts may rely on: `binaries`, `packages`, `bytes_decoded`, `invalid_bytes`,
//! `cpu_model`, `instructions` (`mnemonic`, `code` at code granularity, `importance`,
//! `package_share`, `occurrences`), `supported` (`count`, `weighted_completeness`), `plan`
//! (`instruction`, `weighted_completeness`), `timing` (`seconds`, `decode_mb_per_s`).

mod csv;
mod html;
mod markdown;
mod table;

use crate::analysis::Granularity;
use crate::corpus::{ScanCounts, ScanWarning};
use serde::Serialize;
use std::str::FromStr;

pub use csv::render_csv;
pub use html::render_html;
pub use table::render_table;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub source: String,
    pub files: u64,
    pub elf_files: u64,
    /// x86-64 programs and shared objects swept.
    pub binaries: u64,
    /// Packages with at least one x86-64 binary: the population of every metric.
    pub packages: u64,
    /// All packages of the corpus.
    pub packages_total: u64,
    pub packages_without_code: u64,
    /// Bytes of executable sections decoded (cached or fresh).
    pub bytes_decoded: u64,
    pub invalid_bytes: u64,
    pub scan: ScanCounts,
    pub popularity: PopularitySummary,
    pub cpu_model: String,
    pub cpu_filter: CpuFilterSummary,
    pub granularity: Granularity,
    /// At the selected granularity, most important first.
    pub instructions: Vec<InstructionRow>,
    /// Always at code granularity.
    pub instruction_forms: Vec<InstructionRow>,
    pub extensions: Vec<ExtensionRow>,
    pub supported: SupportedSummary,
    /// `--compare`: the most important instructions the compared set (a census) never ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
    /// Greedy plan from the empty set.
    pub plan: Vec<PlanRow>,
    /// Plan steps needed to reach 50/90/99/100% weighted completeness.
    pub plan_needed: Thresholds,
    /// Greedy plan from the supported set: what to implement next.
    pub next: Vec<PlanRow>,
    pub cpu_models: Vec<ModelRow>,
    pub unresolved_total: u64,
    pub unresolved_libraries: Vec<(String, u64)>,
    pub warnings: Vec<ScanWarning>,
    pub timing: Timing,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PopularitySummary {
    pub source: String,
    pub submissions: u64,
    pub records: u64,
    pub bad_lines: u64,
    pub matched_exact: u64,
    pub matched_stripped: u64,
    pub missing: u64,
    /// Packages with a weight above zero.
    pub weighted_packages: u64,
    pub missing_packages: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CpuFilterSummary {
    /// Instruction forms used by the corpus but outside the CPU model.
    pub instructions_removed: u64,
    pub occurrences_removed: u64,
    pub packages_touched: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstructionRow {
    pub mnemonic: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// CPUID features, e.g. `SSE2` or `AVX512VL+AVX512F`.
    pub extension: String,
    pub importance: f64,
    pub package_share: f64,
    pub packages: u64,
    pub occurrences: u64,
    pub supported: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtensionRow {
    pub extension: String,
    pub forms: u64,
    pub occurrences: u64,
    pub occurrence_share: f64,
    pub max_importance: f64,
    pub in_cpu_model: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SupportedSummary {
    pub set: String,
    pub count: u64,
    pub count_in_corpus: u64,
    pub weighted_completeness: f64,
    pub complete_packages: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub set: String,
    /// How many of the most important instructions were looked at.
    pub top: usize,
    /// Those of them the set does not contain, most important first.
    pub never_executed: Vec<MissingRow>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MissingRow {
    /// Position by importance (1 = most important).
    pub rank: usize,
    pub instruction: String,
    pub extension: String,
    pub importance: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanRow {
    pub instruction: String,
    pub gain: f64,
    pub weighted_completeness: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Thresholds {
    #[serde(rename = "50")]
    pub p50: Option<usize>,
    #[serde(rename = "90")]
    pub p90: Option<usize>,
    #[serde(rename = "99")]
    pub p99: Option<usize>,
    #[serde(rename = "100")]
    pub p100: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    pub cpu_model: String,
    /// Distinct instructions (at the selected granularity) in the model's footprints.
    pub instructions: u64,
    pub supported_weighted_completeness: f64,
    pub needed: Thresholds,
}

impl ModelRow {
    /// The row as displayed: model, in use, supported WC, instructions for 50/90/99/100%.
    pub(crate) fn cells(&self) -> [String; 7] {
        let n = &self.needed;
        [
            self.cpu_model.clone(),
            self.instructions.to_string(),
            pct(self.supported_weighted_completeness),
            needed(n.p50),
            needed(n.p90),
            needed(n.p99),
            needed(n.p100),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    pub seconds: f64,
    pub scan_seconds: f64,
    pub analysis_seconds: f64,
    /// Fresh (uncached) code bytes decoded per second of scan wall time; null when all cached.
    pub decode_mb_per_s: Option<f64>,
    pub cached_files: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
    Html,
    Markdown,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "html" => Ok(Format::Html),
            "markdown" | "md" => Ok(Format::Markdown),
            _ => Err(format!(
                "unknown format `{s}` (expected table, json, csv, html or markdown)"
            )),
        }
    }
}

impl Report {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => render_table(self),
            Format::Json => {
                serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")) + "\n"
            }
            Format::Csv => render_csv(self),
            Format::Html => render_html(self),
            Format::Markdown => markdown::render_markdown(self),
        }
    }
}

/// `0.123456` → `12.35%`.
pub(crate) fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0 + 0.0)
}

pub(crate) fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub(crate) fn needed(n: Option<usize>) -> String {
    n.map_or("-".to_string(), |n| n.to_string())
}
