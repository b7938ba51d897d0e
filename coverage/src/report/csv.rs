//! CSV of the instruction table at the selected granularity (RFC 4180 quoting).

use super::Report;

fn field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn render_csv(r: &Report) -> String {
    let mut out =
        String::from("rank,mnemonic,code,extension,importance,package_share,packages,occurrences,supported\n");
    for (i, row) in r.instructions.iter().enumerate() {
        out += &format!(
            "{},{},{},{},{:.9},{:.9},{},{},{}\n",
            i + 1,
            field(&row.mnemonic),
            field(row.code.as_deref().unwrap_or("")),
            field(&row.extension),
            row.importance,
            row.package_share,
            row.packages,
            row.occurrences,
            row.supported
        );
    }
    out
}
