//! The metrics of Tsai et al. (EuroSys 2016) applied to instructions.
//!
//! With P(p) the probability that an installation has package p and F(p) its footprint:
//!
//! - importance(i) = 1 − Π_{p : i ∈ F(p)} (1 − P(p)) — the probability that an installation
//!   needs instruction i;
//! - weighted completeness(S) = Σ_{p : F(p) ⊆ S} P(p) / Σ_p P(p) — the expected fraction of an
//!   installation's packages that run on a translator supporting S;
//! - the implementation plan: starting from a set, repeatedly add the instruction whose addition
//!   completes the most package weight. When no single instruction completes a package (early
//!   on, every package misses dozens), work towards the package with the best weight per missing
//!   instruction, taking its most important missing instruction first.

use crate::keys::KeySet;

/// A package as the metrics see it: its weight P(p) and its footprint.
#[derive(Clone, Debug)]
pub struct WeightedFootprint {
    pub weight: f64,
    pub keys: KeySet,
}

/// Sum starting from +0.0 (`Iterator::sum` of no floats is −0.0, which prints as "-0.00%").
fn sum(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

/// importance(i) for every key in `0..universe`.
pub fn importance(packages: &[WeightedFootprint], universe: usize) -> Vec<f64> {
    let mut none_needs = vec![1.0f64; universe];
    for p in packages {
        for k in p.keys.iter().filter(|&k| k < universe) {
            none_needs[k] *= 1.0 - p.weight;
        }
    }
    none_needs.into_iter().map(|q| 1.0 - q).collect()
}

/// Unweighted share of packages whose footprint contains each key.
pub fn package_share(packages: &[WeightedFootprint], universe: usize) -> Vec<f64> {
    let mut n = vec![0usize; universe];
    for p in packages {
        p.keys.iter().filter(|&k| k < universe).for_each(|k| n[k] += 1);
    }
    let total = packages.len().max(1) as f64;
    n.into_iter().map(|c| c as f64 / total).collect()
}

/// weighted completeness(S); 0 when no package carries weight.
pub fn weighted_completeness(packages: &[WeightedFootprint], supported: &KeySet) -> f64 {
    let total = sum(packages.iter().map(|p| p.weight));
    if total <= 0.0 {
        return 0.0;
    }
    let done = sum(packages
        .iter()
        .filter(|p| p.keys.is_subset(supported))
        .map(|p| p.weight));
    done / total
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlanStep {
    pub key: usize,
    /// Weighted completeness gained by this step.
    pub gain: f64,
    /// Weighted completeness after this step.
    pub weighted_completeness: f64,
}

/// Greedy implementation plan from `start` over every key some package uses.
pub fn implementation_plan(packages: &[WeightedFootprint], start: &KeySet, importance: &[f64]) -> Vec<PlanStep> {
    let capacity = importance.len();
    let total = sum(packages.iter().map(|p| p.weight));
    let mut have = KeySet::with_capacity(capacity);
    have.union_with(start);
    let mut remaining = KeySet::with_capacity(capacity);
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); capacity];
    for (pi, p) in packages.iter().enumerate() {
        remaining.union_with(&p.keys);
        p.keys.iter().for_each(|k| users[k].push(pi));
    }
    for k in start.iter() {
        remaining.remove(k);
    }
    let mut missing: Vec<usize> = packages.iter().map(|p| p.keys.count_missing_from(&have)).collect();
    let mut done = sum(packages
        .iter()
        .zip(&missing)
        .filter(|(_, &m)| m == 0)
        .map(|(p, _)| p.weight));
    let mut incomplete = packages
        .iter()
        .zip(&missing)
        .filter(|(p, &m)| m > 0 && p.weight > 0.0)
        .count();
    let mut gains = vec![0.0f64; capacity];
    // Importance saturates at 1 for anything the core packages use, so ties are broken by the
    // total weight of the packages that need the instruction, then by how many do.
    let mut demand = vec![0.0f64; capacity];
    for p in packages {
        p.keys.iter().for_each(|k| demand[k] += p.weight);
    }
    let by_importance = |a: usize, b: usize| {
        importance[a]
            .total_cmp(&importance[b])
            .then(demand[a].total_cmp(&demand[b]))
            .then(users[a].len().cmp(&users[b].len()))
            .then(b.cmp(&a))
    };
    let mut plan = Vec::new();

    while !remaining.is_empty() {
        // 1. The instruction that completes the most weight right now.
        let mut touched = Vec::new();
        for (pi, p) in packages.iter().enumerate() {
            if missing[pi] == 1 && p.weight > 0.0 {
                if let Some(k) = p.keys.difference(&have).next() {
                    if gains[k] == 0.0 {
                        touched.push(k);
                    }
                    gains[k] += p.weight;
                }
            }
        }
        let mut pick = touched
            .iter()
            .copied()
            .max_by(|&a, &b| gains[a].total_cmp(&gains[b]).then(by_importance(a, b)));
        touched.iter().for_each(|&k| gains[k] = 0.0);
        // 2. Otherwise the most important missing instruction of the best-value package.
        if pick.is_none() {
            let target = (0..packages.len())
                .filter(|&pi| missing[pi] > 0 && packages[pi].weight > 0.0)
                .max_by(|&a, &b| {
                    (packages[a].weight / missing[a] as f64)
                        .total_cmp(&(packages[b].weight / missing[b] as f64))
                        .then(missing[b].cmp(&missing[a]))
                        .then(b.cmp(&a))
                });
            pick = target.and_then(|pi| packages[pi].keys.difference(&have).max_by(|&a, &b| by_importance(a, b)));
        }
        // 3. Only weightless packages are left: most used first.
        let k = pick.unwrap_or_else(|| {
            remaining
                .iter()
                .max_by(|&a, &b| users[a].len().cmp(&users[b].len()).then(by_importance(a, b)))
                .expect("remaining is not empty")
        });
        have.insert(k);
        remaining.remove(k);
        let before = done;
        for &pi in &users[k] {
            missing[pi] -= 1;
            if missing[pi] == 0 {
                done += packages[pi].weight;
                if packages[pi].weight > 0.0 {
                    incomplete -= 1;
                }
            }
        }
        // Summing in another order than `weighted_completeness` drifts in the last bits: pin the
        // end point so "100%" means every weighted package is complete.
        let wc = match (total > 0.0, incomplete) {
            (false, _) => 0.0,
            (true, 0) => 1.0,
            (true, _) => (done / total).min(1.0),
        };
        plan.push(PlanStep {
            key: k,
            gain: if total > 0.0 { (done - before) / total } else { 0.0 },
            weighted_completeness: wc,
        });
    }
    plan
}

/// How many plan steps reach `threshold` (a fraction), given the completeness before the plan.
pub fn steps_to_reach(plan: &[PlanStep], start_wc: f64, threshold: f64) -> Option<usize> {
    const EPS: f64 = 1e-9;
    if start_wc + EPS >= threshold {
        return Some(0);
    }
    plan.iter()
        .position(|s| s.weighted_completeness + EPS >= threshold)
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(weight: f64, keys: &[usize]) -> WeightedFootprint {
        let mut s = KeySet::with_capacity(8);
        keys.iter().for_each(|&k| s.insert(k));
        WeightedFootprint { weight, keys: s }
    }

    fn set(keys: &[usize]) -> KeySet {
        let mut s = KeySet::with_capacity(8);
        keys.iter().for_each(|&k| s.insert(k));
        s
    }

    /// Hand-computed: A (P=0.5) needs {0,1}; B (P=0.25) needs {0,2}; C (P=0.25) needs {3}.
    fn example() -> Vec<WeightedFootprint> {
        vec![pkg(0.5, &[0, 1]), pkg(0.25, &[0, 2]), pkg(0.25, &[3])]
    }

    #[test]
    fn importance_by_hand() {
        let imp = importance(&example(), 5);
        // key 0: 1 - (1-0.5)(1-0.25) = 0.625
        assert!((imp[0] - 0.625).abs() < 1e-12);
        assert!((imp[1] - 0.5).abs() < 1e-12);
        assert!((imp[2] - 0.25).abs() < 1e-12);
        assert!((imp[3] - 0.25).abs() < 1e-12);
        assert_eq!(imp[4], 0.0);
        let share = package_share(&example(), 5);
        assert!((share[0] - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn weighted_completeness_by_hand() {
        let p = example();
        assert_eq!(weighted_completeness(&p, &set(&[])), 0.0);
        assert_eq!(weighted_completeness(&p, &set(&[0, 1, 2, 3])), 1.0);
        assert_eq!(weighted_completeness(&p, &set(&[0, 1])), 0.5);
        assert_eq!(weighted_completeness(&p, &set(&[0, 1, 3])), 0.75);
        assert_eq!(weighted_completeness(&p, &set(&[1, 2, 3])), 0.25);
        assert_eq!(weighted_completeness(&[], &set(&[1])), 0.0);
    }

    #[test]
    fn plan_by_hand() {
        let p = example();
        let imp = importance(&p, 5);
        let plan = implementation_plan(&p, &set(&[]), &imp);
        // Step 1: only C can be completed by one instruction: key 3 (gain 0.25).
        // Step 2: A and B each miss two; A has the better weight per missing instruction, its
        //         most important missing key is 0 (no gain yet).
        // Step 3: key 1 completes A (gain 0.5); step 4: key 2 completes B.
        let keys: Vec<usize> = plan.iter().map(|s| s.key).collect();
        assert_eq!(keys, vec![3, 0, 1, 2]);
        let wc: Vec<f64> = plan.iter().map(|s| s.weighted_completeness).collect();
        assert_eq!(wc, vec![0.25, 0.25, 0.75, 1.0]);
        assert_eq!(steps_to_reach(&plan, 0.0, 0.5), Some(3));
        assert_eq!(steps_to_reach(&plan, 0.0, 1.0), Some(4));
        // From a start set the plan only lists what is missing.
        let plan = implementation_plan(&p, &set(&[0, 1]), &imp);
        assert_eq!(plan.iter().map(|s| s.key).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(steps_to_reach(&plan, 0.5, 0.5), Some(0));
    }
}
