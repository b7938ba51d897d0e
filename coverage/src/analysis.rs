//! From a scanned corpus to a [`Report`]: weights, footprints per CPU model, metrics, plan.

use crate::corpus::CorpusScan;
use crate::cpu_model::CpuModel;
use crate::footprint::{footprints, Footprints};
use crate::instr_set::InstructionSet;
use crate::keys::{code_count, code_from_index, code_name, mnemonic_count, mnemonic_name, KeySet};
use crate::metrics::{
    implementation_plan, importance, package_share, steps_to_reach, weighted_completeness, PlanStep, WeightedFootprint,
};
use crate::popcon::{MatchKind, Popularity};
use crate::report::*;
use iced_x86::{Code, Instruction};
use serde::Serialize;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Instant;

/// What an instruction is, for counting: one encoding form or one mnemonic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Code,
    Mnemonic,
}

impl Granularity {
    /// What one item is called in reports.
    pub fn noun_singular(self) -> &'static str {
        match self {
            Granularity::Code => "instruction form",
            Granularity::Mnemonic => "mnemonic",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            Granularity::Code => "instruction forms",
            Granularity::Mnemonic => "mnemonics",
        }
    }
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "code" => Ok(Granularity::Code),
            "mnemonic" => Ok(Granularity::Mnemonic),
            _ => Err(format!("unknown granularity `{s}` (expected code or mnemonic)")),
        }
    }
}

impl Granularity {
    fn universe(self) -> usize {
        match self {
            Granularity::Code => code_count(),
            Granularity::Mnemonic => mnemonic_count(),
        }
    }

    fn key_of(self, code: usize) -> usize {
        match self {
            Granularity::Code => code,
            Granularity::Mnemonic => code_from_index(code as u16).map_or(0, |c| c.mnemonic() as usize),
        }
    }

    fn project(self, codes: &KeySet) -> KeySet {
        match self {
            Granularity::Code => codes.clone(),
            Granularity::Mnemonic => {
                let mut s = KeySet::with_capacity(mnemonic_count());
                codes.iter().for_each(|c| s.insert(self.key_of(c)));
                s
            }
        }
    }

    fn key_name(self, key: usize) -> String {
        match self {
            Granularity::Code => code_from_index(key as u16).map(code_name).unwrap_or_default(),
            Granularity::Mnemonic => iced_x86::Mnemonic::try_from(key).map(mnemonic_name).unwrap_or_default(),
        }
    }
}

pub struct AnalysisOptions<'a> {
    pub popularity: &'a Popularity,
    pub cpu_model: CpuModel,
    pub supported: &'a InstructionSet,
    pub granularity: Granularity,
    /// How many steps of the plan from the supported set to list as "next".
    pub next_count: usize,
    /// `--compare`: list which of this many most important instructions the supported set
    /// (a run's census) does not contain at all (at mnemonic granularity: no form of it).
    pub compare_top: Option<usize>,
}

/// The CPUID features of a code, joined: `SSE2`, `AVX512VL+AVX512F`.
pub fn extension_of(code: Code) -> String {
    let mut i = Instruction::default();
    i.set_code(code);
    i.cpuid_features()
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join("+")
}

/// Footprints of one CPU model at code granularity, weighted.
fn weighted_for_model(fp: &Footprints, weights: &[f64], allowed: &KeySet) -> Vec<WeightedFootprint> {
    fp.packages
        .iter()
        .zip(weights)
        .map(|(p, &w)| {
            let mut keys = p.codes.clone();
            keys.intersect_with(allowed);
            WeightedFootprint { weight: w, keys }
        })
        .collect()
}

fn allowed_set(model: CpuModel) -> KeySet {
    let mut s = KeySet::with_capacity(code_count());
    model
        .allowed_codes()
        .iter()
        .enumerate()
        .filter(|(_, &a)| a)
        .for_each(|(c, _)| s.insert(c));
    s
}

/// Supported set at the analysis granularity: a mnemonic counts only when every form of it that
/// the corpus uses is supported.
fn supported_keys(g: Granularity, supported: &KeySet, corpus_codes: &KeySet) -> KeySet {
    match g {
        Granularity::Code => supported.clone(),
        Granularity::Mnemonic => {
            let mut any = KeySet::with_capacity(mnemonic_count());
            let mut missing = KeySet::with_capacity(mnemonic_count());
            for c in corpus_codes.iter() {
                if supported.contains(c) {
                    any.insert(g.key_of(c));
                } else {
                    missing.insert(g.key_of(c));
                }
            }
            for m in missing.iter() {
                any.remove(m);
            }
            any
        }
    }
}

struct ModelPlan {
    /// The model's allowed forms and its code-granularity footprints.
    allowed: KeySet,
    code_level: Vec<WeightedFootprint>,
    universe: usize,
    supported_wc: f64,
    complete_packages: usize,
    plan: Vec<PlanStep>,
    needed: Thresholds,
    packages: Vec<WeightedFootprint>,
    importance: Vec<f64>,
}

fn plan_model(fp: &Footprints, weights: &[f64], model: CpuModel, g: Granularity, supported: &KeySet) -> ModelPlan {
    let allowed = allowed_set(model);
    let code_level = weighted_for_model(fp, weights, &allowed);
    let supported_wc = weighted_completeness(&code_level, supported);
    let complete_packages = code_level.iter().filter(|p| p.keys.is_subset(supported)).count();
    let packages: Vec<WeightedFootprint> = code_level
        .iter()
        .map(|p| WeightedFootprint {
            weight: p.weight,
            keys: g.project(&p.keys),
        })
        .collect();
    let imp = importance(&packages, g.universe());
    let plan = implementation_plan(&packages, &KeySet::with_capacity(g.universe()), &imp);
    let reach = |t: f64| steps_to_reach(&plan, 0.0, t);
    let needed = Thresholds {
        p50: reach(0.5),
        p90: reach(0.9),
        p99: reach(0.99),
        p100: reach(1.0),
    };
    let mut universe = KeySet::with_capacity(g.universe());
    packages.iter().for_each(|p| universe.union_with(&p.keys));
    ModelPlan {
        allowed,
        code_level,
        universe: universe.len(),
        supported_wc,
        complete_packages,
        plan,
        needed,
        packages,
        importance: imp,
    }
}

pub fn analyze(corpus: &CorpusScan, opts: &AnalysisOptions) -> Report {
    let started = Instant::now();
    let g = opts.granularity;
    let fp = footprints(corpus);

    // Weights.
    let mut pop = PopularitySummary {
        source: opts.popularity.source.clone(),
        submissions: opts.popularity.submissions,
        records: opts.popularity.len() as u64,
        bad_lines: opts.popularity.bad_lines.len() as u64,
        ..PopularitySummary::default()
    };
    let weights: Vec<f64> = fp
        .packages
        .iter()
        .map(|p| {
            let w = opts.popularity.weigh(&p.name);
            match w.matched {
                MatchKind::Exact => pop.matched_exact += 1,
                MatchKind::Stripped => pop.matched_stripped += 1,
                MatchKind::Missing => pop.missing_packages.push(p.name.clone()),
            }
            if w.p > 0.0 {
                pop.weighted_packages += 1;
            }
            w.p
        })
        .collect();
    pop.missing = pop.missing_packages.len() as u64;

    // Occurrences over packaged binaries, per code.
    let mut occurrences = vec![0u64; code_count()];
    for b in corpus.binaries.iter().filter(|b| b.package.is_some()) {
        for &(c, n) in &b.scan.counts {
            if let Some(o) = occurrences.get_mut(c as usize) {
                *o += u64::from(n);
            }
        }
    }

    // The selected model, and every model for the comparison table.
    let supported = &opts.supported.codes;
    let mut corpus_codes = KeySet::with_capacity(code_count());
    fp.packages.iter().for_each(|p| corpus_codes.union_with(&p.codes));
    let supported_g = supported_keys(g, supported, &corpus_codes);
    let mut cpu_models = Vec::new();
    let mut selected = None;
    for model in CpuModel::ALL {
        let mp = plan_model(&fp, &weights, model, g, supported);
        cpu_models.push(ModelRow {
            cpu_model: model.to_string(),
            instructions: mp.universe as u64,
            supported_weighted_completeness: mp.supported_wc,
            needed: mp.needed.clone(),
        });
        if model == opts.cpu_model {
            selected = Some(mp);
        }
    }
    let mp = selected.expect("CpuModel::ALL contains every model");

    // What the CPU-model filter removed.
    let allowed = &mp.allowed;
    let mut cpu_filter = CpuFilterSummary::default();
    for c in corpus_codes.iter().filter(|&c| !allowed.contains(c)) {
        cpu_filter.instructions_removed += 1;
        cpu_filter.occurrences_removed += occurrences[c];
    }
    cpu_filter.packages_touched = fp
        .packages
        .iter()
        .filter(|p| p.codes.count_missing_from(allowed) > 0)
        .count() as u64;

    // Instruction tables.
    let code_level = &mp.code_level;
    let code_imp = importance(code_level, code_count());
    let code_share = package_share(code_level, code_count());
    let mut code_packages = vec![0u64; code_count()];
    code_level
        .iter()
        .for_each(|p| p.keys.iter().for_each(|k| code_packages[k] += 1));
    let mut forms: Vec<(usize, InstructionRow)> = Vec::new();
    for c in corpus_codes.iter().filter(|&c| allowed.contains(c)) {
        let code = code_from_index(c as u16).unwrap_or(Code::INVALID);
        forms.push((
            c,
            InstructionRow {
                mnemonic: mnemonic_name(code.mnemonic()),
                code: Some(code_name(code)),
                extension: extension_of(code),
                importance: code_imp[c],
                package_share: code_share[c],
                packages: code_packages[c],
                occurrences: occurrences[c],
                supported: supported.contains(c),
            },
        ));
    }
    forms.sort_by(|a, b| row_order(&a.1, &b.1));
    let instructions = match g {
        Granularity::Code => forms.iter().map(|(_, r)| r.clone()).collect(),
        Granularity::Mnemonic => {
            let share = package_share(&mp.packages, mnemonic_count());
            let mut rows: BTreeMap<String, InstructionRow> = BTreeMap::new();
            // Forms are sorted by importance, so the first form of a mnemonic names its extension.
            for (c, f) in &forms {
                let key = g.key_of(*c);
                let row = rows.entry(f.mnemonic.clone()).or_insert_with(|| InstructionRow {
                    mnemonic: f.mnemonic.clone(),
                    code: None,
                    extension: f.extension.clone(),
                    importance: mp.importance[key],
                    package_share: share[key],
                    packages: mp.packages.iter().filter(|p| p.keys.contains(key)).count() as u64,
                    occurrences: 0,
                    supported: supported_g.contains(key),
                });
                row.occurrences += f.occurrences;
            }
            let mut rows: Vec<InstructionRow> = rows.into_values().collect();
            rows.sort_by(row_order);
            rows
        }
    };

    // What a census never executed among the most important instructions.
    let comparison = opts.compare_top.map(|top| {
        let executed: std::collections::HashSet<String> = supported.iter().map(|c| g.key_name(g.key_of(c))).collect();
        let name = |r: &InstructionRow| r.code.clone().unwrap_or_else(|| r.mnemonic.clone());
        Comparison {
            set: opts.supported.name.clone(),
            top,
            never_executed: instructions
                .iter()
                .take(top)
                .enumerate()
                .filter(|(_, r)| !executed.contains(&name(r)))
                .map(|(i, r)| MissingRow {
                    rank: i + 1,
                    instruction: name(r),
                    extension: r.extension.clone(),
                    importance: r.importance,
                })
                .collect(),
        }
    });

    // ISA-extension breakdown over every form the corpus uses (before the model filter).
    let mut ext: BTreeMap<String, ExtensionRow> = BTreeMap::new();
    let total_occ: u64 = corpus_codes.iter().map(|c| occurrences[c]).sum();
    for c in corpus_codes.iter() {
        let code = code_from_index(c as u16).unwrap_or(Code::INVALID);
        let name = extension_of(code);
        let row = ext.entry(name.clone()).or_insert_with(|| ExtensionRow {
            extension: name,
            in_cpu_model: allowed.contains(c),
            ..ExtensionRow::default()
        });
        row.forms += 1;
        row.occurrences += occurrences[c];
        row.max_importance = row.max_importance.max(code_imp[c]);
    }
    let mut extensions: Vec<ExtensionRow> = ext.into_values().collect();
    extensions
        .iter_mut()
        .for_each(|e| e.occurrence_share = e.occurrences as f64 / total_occ.max(1) as f64);
    extensions.sort_by(|a, b| b.occurrences.cmp(&a.occurrences).then(a.extension.cmp(&b.extension)));

    // Plans.
    let to_rows = |plan: &[PlanStep], limit: usize| -> Vec<PlanRow> {
        plan.iter()
            .take(limit)
            .map(|s| PlanRow {
                instruction: g.key_name(s.key),
                gain: s.gain,
                weighted_completeness: s.weighted_completeness,
            })
            .collect()
    };
    let plan = to_rows(&mp.plan, usize::MAX);
    let next_plan = implementation_plan(&mp.packages, &supported_g, &mp.importance);
    let next = to_rows(&next_plan, opts.next_count);

    let mut unresolved: Vec<(String, u64)> = fp.unresolved.iter().map(|(k, v)| (k.clone(), *v)).collect();
    unresolved.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let packages_with_code = fp.packages.len() as u64;
    let fresh = corpus.counts.fresh_code_bytes;
    Report {
        source: corpus.source.clone(),
        files: corpus.counts.files,
        elf_files: corpus.counts.elf_files,
        binaries: corpus.binaries.len() as u64,
        packages: packages_with_code,
        packages_total: corpus.packages.len() as u64,
        packages_without_code: corpus.packages.len().saturating_sub(fp.packages.len()) as u64,
        bytes_decoded: corpus.code_bytes(),
        invalid_bytes: corpus.invalid_bytes(),
        scan: corpus.counts.clone(),
        popularity: pop,
        cpu_model: opts.cpu_model.to_string(),
        cpu_filter,
        granularity: g,
        instructions,
        instruction_forms: forms.into_iter().map(|(_, r)| r).collect(),
        extensions,
        supported: SupportedSummary {
            set: opts.supported.name.clone(),
            count: supported.len() as u64,
            count_in_corpus: supported.iter().filter(|&c| corpus_codes.contains(c)).count() as u64,
            weighted_completeness: mp.supported_wc,
            complete_packages: mp.complete_packages as u64,
        },
        comparison,
        plan,
        plan_needed: mp.needed.clone(),
        next,
        cpu_models,
        unresolved_total: unresolved.len() as u64,
        unresolved_libraries: unresolved.into_iter().take(20).collect(),
        warnings: corpus.warnings.clone(),
        timing: Timing {
            seconds: corpus.scan_seconds + started.elapsed().as_secs_f64(),
            scan_seconds: corpus.scan_seconds,
            analysis_seconds: started.elapsed().as_secs_f64(),
            decode_mb_per_s: (fresh > 0 && corpus.scan_seconds > 0.0).then(|| fresh as f64 / 1e6 / corpus.scan_seconds),
            cached_files: corpus.counts.cached,
        },
    }
}

/// Most important first; ties by static occurrences, then by name.
fn row_order(a: &InstructionRow, b: &InstructionRow) -> std::cmp::Ordering {
    b.importance
        .total_cmp(&a.importance)
        .then(b.occurrences.cmp(&a.occurrences))
        .then(a.mnemonic.cmp(&b.mnemonic))
        .then(a.code.cmp(&b.code))
}
