//! Markdown status of the supported set (the README's "Translator status" section): supported
//! forms and mnemonics, weighted completeness per CPU model, and what to implement next.

use super::{needed, pct, Report};
use std::collections::BTreeSet;
use std::fmt::Write;

pub(crate) fn render_markdown(r: &Report) -> String {
    let mut out = String::new();
    let mnemonics: BTreeSet<&str> = r
        .instruction_forms
        .iter()
        .filter(|f| f.supported)
        .map(|f| f.mnemonic.as_str())
        .collect();
    let _ = writeln!(
        out,
        "Supported set `{}`: **{}** instruction forms ({} {} used by this corpus, covering {} mnemonics).\n",
        r.supported.set,
        r.supported.count,
        r.supported.count_in_corpus,
        if r.granularity == crate::Granularity::Code {
            "forms"
        } else {
            "mnemonics"
        },
        mnemonics.len(),
    );
    let _ = writeln!(
        out,
        "Corpus: {} ({} packages with x86-64 code, {} binaries); popularity: {}.\n",
        r.source, r.packages, r.binaries, r.popularity.source
    );
    let _ = writeln!(
        out,
        "| CPU model | {} in use | weighted completeness | needed for 50/90/99/100% |",
        r.granularity.noun()
    );
    let _ = writeln!(out, "|---|---:|---:|---|");
    for m in &r.cpu_models {
        let n = &m.needed;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} / {} / {} |",
            m.cpu_model,
            m.instructions,
            pct(m.supported_weighted_completeness),
            needed(n.p50),
            needed(n.p90),
            needed(n.p99),
            needed(n.p100)
        );
    }
    let _ = writeln!(out, "\nNext for `{}` (greedy from the supported set):\n", r.cpu_model);
    if r.next.is_empty() {
        let _ = writeln!(
            out,
            "nothing: every {} this corpus uses under this model is supported.",
            r.granularity.noun_singular()
        );
    } else {
        let _ = writeln!(out, "| step | instruction | gain | WC after |");
        let _ = writeln!(out, "|---:|---|---:|---:|");
        for (i, step) in r.next.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | `{}` | {} | {} |",
                i + 1,
                step.instruction,
                pct(step.gain),
                pct(step.weighted_completeness)
            );
        }
    }
    out
}
