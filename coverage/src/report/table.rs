//! Terminal report: summary, top instructions, extensions, CPU models, the plan.

use super::{mb, pct, Report};
use std::fmt::Write;

const TOP: usize = 30;

pub fn render_table(r: &Report) -> String {
    let mut o = String::new();
    let s = &r.scan;
    let _ = writeln!(o, "hbt coverage — {}", r.source);
    let _ = writeln!(o);
    let _ = writeln!(o, "Corpus");
    let _ = writeln!(o, "  files considered       {:>12}", s.files);
    let _ = writeln!(
        o,
        "  ELF files              {:>12}   (other arch {}, relocatable/core {}, malformed {}, unreadable {})",
        r.elf_files, s.other_arch, s.not_loadable, s.malformed, s.unreadable
    );
    let _ = writeln!(
        o,
        "  x86-64 binaries        {:>12}   ({} owned by no package)",
        r.binaries, s.unowned
    );
    let _ = writeln!(
        o,
        "  packages               {:>12}   with x86-64 code, of {} ({} without code{})",
        r.packages,
        r.packages_total,
        r.packages_without_code,
        if s.broken_debs > 0 {
            format!(", {} broken .deb", s.broken_debs)
        } else {
            String::new()
        }
    );
    let p = &r.popularity;
    let _ = writeln!(
        o,
        "  with popularity weight {:>12}   (exact name {}, version-stripped {}, not in popcon {})",
        p.weighted_packages, p.matched_exact, p.matched_stripped, p.missing
    );
    let _ = writeln!(
        o,
        "  code decoded           {:>12}   ({} invalid bytes)",
        mb(r.bytes_decoded),
        r.invalid_bytes
    );
    let _ = writeln!(
        o,
        "  popularity data        {} ({} records, {} submissions{})",
        p.source,
        p.records,
        p.submissions,
        if p.bad_lines > 0 {
            format!(", {} unparsable lines", p.bad_lines)
        } else {
            String::new()
        }
    );
    let f = &r.cpu_filter;
    let _ = writeln!(
        o,
        "  CPU model              {:>12}   (left out: {} forms, {} occurrences, in {} packages)",
        r.cpu_model, f.instructions_removed, f.occurrences_removed, f.packages_touched
    );
    if r.unresolved_total > 0 {
        let top: Vec<String> = r
            .unresolved_libraries
            .iter()
            .take(5)
            .map(|(n, c)| format!("{n} ×{c}"))
            .collect();
        let _ = writeln!(
            o,
            "  unresolved DT_NEEDED   {:>12}   ({})",
            r.unresolved_total,
            top.join(", ")
        );
    }
    if !r.warnings.is_empty() {
        let _ = writeln!(
            o,
            "  warnings               {:>12}   (listed on stderr; all in --format json)",
            r.warnings.len()
        );
    }

    let _ = writeln!(o);
    let unit = r.granularity.noun();
    let _ = writeln!(o, "Top {TOP} {unit} by importance ({} in use)", r.instructions.len());
    let _ = writeln!(
        o,
        "  {:>4}  {:<34} {:>10} {:>9} {:>14}  extension",
        "rank", "instruction", "importance", "packages", "occurrences"
    );
    for (i, row) in r.instructions.iter().take(TOP).enumerate() {
        let name = row.code.as_deref().unwrap_or(&row.mnemonic);
        let _ = writeln!(
            o,
            "  {:>4}  {:<34} {:>10} {:>9} {:>14}  {}",
            i + 1,
            name,
            pct(row.importance),
            row.packages,
            row.occurrences,
            row.extension
        );
    }

    let _ = writeln!(o);
    let _ = writeln!(o, "ISA extensions (by static occurrences, all forms the corpus uses)");
    let _ = writeln!(
        o,
        "  {:<30} {:>7} {:>14} {:>8} {:>10}  in model",
        "extension", "forms", "occurrences", "share", "max imp."
    );
    for e in r.extensions.iter().take(25) {
        let _ = writeln!(
            o,
            "  {:<30} {:>7} {:>14} {:>8} {:>10}  {}",
            e.extension,
            e.forms,
            e.occurrences,
            pct(e.occurrence_share),
            pct(e.max_importance),
            if e.in_cpu_model { "yes" } else { "no" }
        );
    }
    if r.extensions.len() > 25 {
        let _ = writeln!(o, "  … {} more", r.extensions.len() - 25);
    }

    let _ = writeln!(o);
    let sup = &r.supported;
    let _ = writeln!(
        o,
        "Supported set `{}`: {} forms ({} used by the corpus)",
        sup.set, sup.count, sup.count_in_corpus
    );
    if r.popularity.weighted_packages == 0 {
        // 0 of 0 weight: a completeness would be a made-up number.
        let _ = writeln!(
            o,
            "  weighted completeness  n/a: no package of the corpus has a popularity weight ({} of {} packages fully supported)",
            sup.complete_packages, r.packages
        );
    } else {
        let _ = writeln!(
            o,
            "  weighted completeness  {}   ({} of {} packages fully supported)",
            pct(sup.weighted_completeness),
            sup.complete_packages,
            r.packages
        );
    }

    if let Some(c) = &r.comparison {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Of the {} most important {unit}, `{}` never executed {}{}",
            c.top,
            c.set,
            c.never_executed.len(),
            if c.never_executed.is_empty() { "" } else { ":" }
        );
        for m in &c.never_executed {
            let _ = writeln!(
                o,
                "  #{:<4} {:<28} {:<24} importance {}",
                m.rank,
                m.instruction,
                m.extension,
                pct(m.importance)
            );
        }
    }

    let _ = writeln!(o);
    let _ = writeln!(o, "CPU models ({unit} needed, greedy plan from nothing)");
    let _ = writeln!(
        o,
        "  {:<10} {:>8} {:>10} {:>6} {:>6} {:>6} {:>6}",
        "model", "in use", "supported", "50%", "90%", "99%", "100%"
    );
    for m in &r.cpu_models {
        let [model, in_use, wc, p50, p90, p99, p100] = m.cells();
        let _ = writeln!(
            o,
            "  {model:<10} {in_use:>8} {wc:>10} {p50:>6} {p90:>6} {p99:>6} {p100:>6}"
        );
    }

    let _ = writeln!(o);
    let _ = writeln!(o, "Implement next (greedy from the supported set, {})", r.cpu_model);
    let _ = writeln!(
        o,
        "  {:>4}  {:<34} {:>10} {:>12}",
        "step", "instruction", "gain", "WC after"
    );
    for (i, s) in r.next.iter().enumerate() {
        let _ = writeln!(
            o,
            "  {:>4}  {:<34} {:>10} {:>12}",
            i + 1,
            s.instruction,
            pct(s.gain),
            pct(s.weighted_completeness)
        );
    }
    let _ = writeln!(o);
    let t = &r.timing;
    let rate = t
        .decode_mb_per_s
        .map_or("all cached".to_string(), |v| format!("{v:.0} MB/s decoded"));
    let _ = writeln!(
        o,
        "Time: {:.2} s (scan {:.2} s, {rate}, {} files from cache; analysis {:.2} s)",
        t.seconds, t.scan_seconds, t.cached_files, t.analysis_seconds
    );
    o
}
