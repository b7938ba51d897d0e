//! Self-contained HTML report: inline CSS and SVG, no scripts, no network.

use super::{mb, pct, Report};
use std::fmt::Write;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const W: f64 = 720.0;
const H: f64 = 300.0;
const PAD: f64 = 48.0;

/// Line chart of weighted completeness against instructions implemented.
fn wc_curve(r: &Report) -> String {
    let n = r.plan.len().max(1) as f64;
    let x = |i: f64| PAD + i / n * (W - 2.0 * PAD);
    let y = |v: f64| H - PAD - v * (H - 2.0 * PAD);
    let mut pts = format!("{:.1},{:.1}", x(0.0), y(0.0));
    for (i, s) in r.plan.iter().enumerate() {
        let _ = write!(pts, " {:.1},{:.1}", x(i as f64 + 1.0), y(s.weighted_completeness));
    }
    let mut svg = format!(r#"<svg viewBox="0 0 {W} {H}" role="img" aria-label="weighted completeness curve">"#);
    for t in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let (x1, yt, xl, yl, label) = (W - PAD, y(t), PAD - 6.0, y(t) + 4.0, (t * 100.0) as u32);
        let _ = write!(
            svg,
            r#"<line x1="{PAD}" x2="{x1}" y1="{yt:.1}" y2="{yt:.1}" class="grid"/><text x="{xl}" y="{yl:.1}" class="lbl" text-anchor="end">{label}%</text>"#
        );
    }
    for frac in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}" class="lbl" text-anchor="middle">{}</text>"#,
            x(frac * n),
            H - PAD + 18.0,
            (frac * n).round() as u64
        );
    }
    for (label, v) in [("90%", r.plan_needed.p90), ("99%", r.plan_needed.p99)] {
        if let Some(v) = v {
            let _ = write!(
                svg,
                r#"<line x1="{0:.1}" x2="{0:.1}" y1="{PAD}" y2="{1}" class="mark"/><text x="{2:.1}" y="{3}" class="lbl">{label}: {v}</text>"#,
                x(v as f64),
                H - PAD,
                x(v as f64) + 4.0,
                PAD + 12.0
            );
        }
    }
    let _ = write!(
        svg,
        r#"<polyline points="{pts}" class="curve"/><text x="{}" y="{}" class="lbl" text-anchor="middle">instructions implemented (greedy plan)</text></svg>"#,
        W / 2.0,
        H - 8.0
    );
    svg
}

/// Histogram of instruction importance in ten bins.
fn importance_histogram(r: &Report) -> String {
    let mut bins = [0u64; 10];
    for row in &r.instructions {
        bins[((row.importance * 10.0) as usize).min(9)] += 1;
    }
    let max = bins.iter().copied().max().unwrap_or(1).max(1) as f64;
    let bw = (W - 2.0 * PAD) / 10.0;
    let mut svg = format!(r#"<svg viewBox="0 0 {W} {H}" role="img" aria-label="importance distribution">"#);
    for (i, &b) in bins.iter().enumerate() {
        let h = b as f64 / max * (H - 2.0 * PAD);
        let x0 = PAD + i as f64 * bw;
        let _ = write!(
            svg,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" class="bar"/><text x="{:.1}" y="{:.1}" class="lbl" text-anchor="middle">{b}</text><text x="{:.1}" y="{}" class="lbl" text-anchor="middle">{}–{}%</text>"#,
            x0 + 2.0,
            H - PAD - h,
            bw - 4.0,
            x0 + bw / 2.0,
            H - PAD - h - 4.0,
            x0 + bw / 2.0,
            H - PAD + 16.0,
            i * 10,
            i * 10 + 10
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" class="lbl" text-anchor="middle">importance (instructions per bin)</text></svg>"#,
        W / 2.0,
        H - 8.0
    );
    svg
}

/// Horizontal bars: share of static occurrences per ISA extension.
fn extension_bars(r: &Report) -> String {
    let rows: Vec<_> = r.extensions.iter().take(15).collect();
    let rh = 20.0;
    let h = PAD + rows.len() as f64 * rh;
    let label_w = 230.0;
    let mut svg = format!(r#"<svg viewBox="0 0 {W} {h}" role="img" aria-label="ISA extension breakdown">"#);
    let max = rows.iter().map(|e| e.occurrence_share).fold(0.0, f64::max).max(1e-12);
    for (i, e) in rows.iter().enumerate() {
        let y0 = 10.0 + i as f64 * rh;
        let w = e.occurrence_share / max * (W - label_w - 90.0);
        let class = if e.in_cpu_model { "bar" } else { "bar out" };
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" class="lbl" text-anchor="end">{}</text><rect x="{label_w}" y="{y0:.1}" width="{w:.1}" height="{:.1}" class="{class}"/><text x="{:.1}" y="{:.1}" class="lbl">{}</text>"#,
            label_w - 6.0,
            y0 + 13.0,
            esc(&e.extension),
            rh - 4.0,
            label_w + w + 4.0,
            y0 + 13.0,
            pct(e.occurrence_share)
        );
    }
    svg + "</svg>"
}

pub fn render_html(r: &Report) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>hbt coverage — {src}</title><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1000px;color:#222;padding:0 1em}}
h1{{font-size:1.5em}} h2{{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}}
table{{border-collapse:collapse;margin:.5em 0}} td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #eee}}
td:first-child,th:first-child,td.l{{text-align:left}} svg{{width:100%;max-width:{W}px;background:#fafafa;border:1px solid #eee}}
.grid{{stroke:#ddd}} .curve{{fill:none;stroke:#1565c0;stroke-width:2}} .bar{{fill:#1565c0}} .out{{fill:#c62828}}
.mark{{stroke:#888;stroke-dasharray:4 3}} .lbl{{font-size:11px;fill:#444}} .big{{font-size:1.3em;font-weight:600}}
</style></head><body><h1>hbt coverage — {src}</h1>"#,
        src = esc(&r.source)
    );
    let p = &r.popularity;
    let s = &r.scan;
    let _ = write!(
        o,
        "<p class=big>Weighted completeness of <code>{}</code> ({} forms) on {}: {}</p>",
        esc(&r.supported.set),
        r.supported.count,
        esc(&r.cpu_model),
        pct(r.supported.weighted_completeness)
    );
    let _ = write!(o, "<h2>Corpus</h2><table>");
    for (k, v) in [
        ("files considered", s.files.to_string()),
        (
            "ELF files",
            format!(
                "{} (other arch {}, relocatable {}, malformed {}, unreadable {})",
                r.elf_files, s.other_arch, s.not_loadable, s.malformed, s.unreadable
            ),
        ),
        ("x86-64 binaries", format!("{} ({} unowned)", r.binaries, s.unowned)),
        (
            "packages with x86-64 code",
            format!("{} of {}", r.packages, r.packages_total),
        ),
        (
            "packages with popularity weight",
            format!(
                "{} (exact {}, version-stripped {}, missing {})",
                p.weighted_packages, p.matched_exact, p.matched_stripped, p.missing
            ),
        ),
        (
            "popularity data",
            format!("{} — {} submissions", p.source, p.submissions),
        ),
        (
            "code decoded",
            format!("{} ({} invalid bytes)", mb(r.bytes_decoded), r.invalid_bytes),
        ),
        (
            "CPU model",
            format!(
                "{} (left out {} forms, {} occurrences, {} packages touched)",
                r.cpu_model,
                r.cpu_filter.instructions_removed,
                r.cpu_filter.occurrences_removed,
                r.cpu_filter.packages_touched
            ),
        ),
        ("time", format!("{:.2} s", r.timing.seconds)),
    ] {
        let _ = write!(o, "<tr><td>{k}</td><td class=l>{}</td></tr>", esc(&v));
    }
    let _ = write!(o, "</table>");
    let _ = write!(
        o,
        "<h2>Weighted completeness against instructions implemented</h2>{}",
        wc_curve(r)
    );
    let _ = write!(o, "<h2>CPU models</h2><table><tr><th>model</th><th>in use</th><th>supported WC</th><th>50%</th><th>90%</th><th>99%</th><th>100%</th></tr>");
    for m in &r.cpu_models {
        let cells: String = m.cells().iter().map(|c| format!("<td>{}</td>", esc(c))).collect();
        let _ = write!(o, "<tr>{cells}</tr>");
    }
    let _ = write!(o, "</table><h2>Importance distribution</h2>{}", importance_histogram(r));
    let _ = write!(
        o,
        "<h2>ISA extensions (share of static occurrences; red = outside the CPU model)</h2>{}",
        extension_bars(r)
    );
    let _ = write!(
        o,
        "<h2>Implement next</h2><table><tr><th>step</th><th>instruction</th><th>gain</th><th>WC after</th></tr>"
    );
    for (i, st) in r.next.iter().enumerate() {
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=l>{}</td><td>{}</td><td>{}</td></tr>",
            i + 1,
            esc(&st.instruction),
            pct(st.gain),
            pct(st.weighted_completeness)
        );
    }
    let _ = write!(o, "</table><h2>Top 100 instructions by importance</h2><table><tr><th>rank</th><th>instruction</th><th>importance</th><th>packages</th><th>occurrences</th><th>extension</th><th>supported</th></tr>");
    for (i, row) in r.instructions.iter().take(100).enumerate() {
        let name = row.code.as_deref().unwrap_or(&row.mnemonic);
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=l>{}</td><td>{}</td></tr>",
            i + 1,
            esc(name),
            pct(row.importance),
            row.packages,
            row.occurrences,
            esc(&row.extension),
            if row.supported { "yes" } else { "" }
        );
    }
    let _ = writeln!(
        o,
        "</table><p>Generated by <code>hbt coverage</code>.</p></body></html>"
    );
    o
}
