//! Choosing the mixing mode of each batch (spec §4.2): one mode per batch and
//! repeat, uniform or with given probabilities, `vanilla` at most once per batch.

use rand::Rng;
use rand::RngCore;

/// Picks which of the configured modes mixes the current batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ModePicker {
    /// Mode names, in config order.
    pub modes: Vec<String>,
    /// Selection probabilities; `None` = uniform over the candidates.
    pub probs: Option<Vec<f64>>,
    /// Mixing repeats per batch (values ≤ 1 mean 1).
    pub repeat: usize,
}

impl ModePicker {
    /// A picker over `modes` with optional probabilities and a repeat count.
    pub fn new(modes: Vec<String>, probs: Option<Vec<f64>>, repeat: usize) -> Self {
        Self {
            modes,
            probs,
            repeat: repeat.max(1),
        }
    }

    /// The mode indices used for one batch, one per repeat. After `vanilla` is
    /// drawn it is excluded from the later repeats of the same batch; with
    /// probabilities given, the remaining ones are renormalized (the reference
    /// would fail on a length mismatch there, spec §4.2).
    pub fn pick(&self, rng: &mut dyn RngCore) -> Vec<usize> {
        let mut removed: Option<usize> = None;
        let mut out = Vec::with_capacity(self.repeat);
        for _ in 0..self.repeat {
            let candidates: Vec<usize> = (0..self.modes.len())
                .filter(|i| Some(*i) != removed)
                .collect();
            if candidates.is_empty() {
                break;
            }
            let chosen = match &self.probs {
                None => candidates[rng.random_range(0..candidates.len())],
                Some(p) => {
                    let total: f64 = candidates.iter().map(|&i| p[i]).sum();
                    let mut u = rng.random::<f64>() * total;
                    let mut pick = *candidates.last().unwrap();
                    for &i in &candidates {
                        if u < p[i] {
                            pick = i;
                            break;
                        }
                        u -= p[i];
                    }
                    pick
                }
            };
            if self.modes[chosen] == "vanilla" {
                removed = Some(chosen);
            }
            out.push(chosen);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn single_mode_always_picked() {
        let p = ModePicker::new(names(&["cutmix"]), None, 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..10 {
            assert_eq!(p.pick(&mut rng), vec![0]);
        }
    }

    #[test]
    fn probabilities_are_respected() {
        let p = ModePicker::new(names(&["mixup", "cutmix"]), Some(vec![0.8, 0.2]), 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let n = 20_000;
        let first = (0..n).filter(|_| p.pick(&mut rng)[0] == 0).count() as f64 / n as f64;
        // 5 standard deviations of a binomial proportion at p = 0.8.
        assert!(
            (first - 0.8).abs() < 5.0 * (0.16f64 / n as f64).sqrt(),
            "{first}"
        );
    }

    #[test]
    fn uniform_without_probabilities() {
        let p = ModePicker::new(names(&["mixup", "cutmix", "vanilla"]), None, 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[p.pick(&mut rng)[0]] += 1;
        }
        for c in counts {
            assert!((c as f64 - 10_000.0).abs() < 5.0 * (30_000.0f64 * 2.0 / 9.0).sqrt());
        }
    }

    #[test]
    fn vanilla_is_picked_at_most_once_per_batch() {
        let p = ModePicker::new(names(&["vanilla", "mixup"]), None, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut saw_vanilla = false;
        for _ in 0..200 {
            let picks = p.pick(&mut rng);
            assert_eq!(picks.len(), 3);
            let v = picks.iter().filter(|&&i| i == 0).count();
            assert!(v <= 1, "{picks:?}");
            saw_vanilla |= v == 1;
        }
        assert!(saw_vanilla);
    }
}
