//! Distribution tests for the shared draws: λ ~ Beta(α, α) (one-sample KS test
//! against the exact CDF) and uniform partner permutations (chi-square).

mod common;

use mix_ops::sample::{beta_lambda, permutation, permutation_avoiding_fixed_points};

/// ln Γ(x) by the Lanczos approximation (g = 7, 9 terms; |error| < 1e-13 for x > 0).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Continued fraction of the incomplete beta function (modified Lentz).
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 - qab * x / qap;
    d = if d.abs() < TINY { TINY } else { d };
    d = 1.0 / d;
    let mut h = d;
    for m in 1..1000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for aa in [
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ] {
            d = 1.0 + aa * d;
            d = if d.abs() < TINY { TINY } else { d };
            c = 1.0 + aa / c;
            c = if c.abs() < TINY { TINY } else { c };
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// Regularized incomplete beta `I_x(a, b)`: the Beta(a, b) CDF.
fn beta_cdf(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// KS statistic of `samples` against `cdf`.
fn ks_statistic(mut samples: Vec<f64>, cdf: impl Fn(f64) -> f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len() as f64;
    samples
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let f = cdf(s);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0, f64::max)
}

/// Asymptotic KS critical value at significance 0.001: √(−ln(0.0005)/2)/√n.
fn ks_critical(n: usize) -> f64 {
    (-(0.0005f64).ln() / 2.0).sqrt() / (n as f64).sqrt()
}

#[test]
fn beta_cdf_matches_closed_forms() {
    // Beta(1,1) is uniform; Beta(2,2) has CDF 3x² − 2x³; Beta(0.5,0.5) is the arcsine law.
    for &x in &[0.01, 0.2, 0.5, 0.77, 0.999] {
        assert!((beta_cdf(x, 1.0, 1.0) - x).abs() < 1e-12);
        assert!((beta_cdf(x, 2.0, 2.0) - (3.0 * x * x - 2.0 * x * x * x)).abs() < 1e-12);
        let arcsine = 2.0 / std::f64::consts::PI * x.sqrt().asin();
        assert!((beta_cdf(x, 0.5, 0.5) - arcsine).abs() < 1e-10);
    }
}

#[test]
fn lambda_follows_beta_alpha_alpha() {
    const DRAWS: usize = 20_000;
    for (seed, &alpha) in [0.2, 1.0, 2.0].iter().enumerate() {
        let mut rng = common::rng(100 + seed as u64);
        let samples: Vec<f64> = (0..DRAWS).map(|_| beta_lambda(&mut rng, alpha)).collect();
        assert!(samples.iter().all(|&l| (0.0..=1.0).contains(&l)));
        let d = ks_statistic(samples.clone(), |x| beta_cdf(x, alpha, alpha));
        assert!(d < ks_critical(DRAWS), "α={alpha}: KS D={d}");
        // The test has power: the same samples are rejected against a wrong α.
        let wrong = ks_statistic(samples, |x| beta_cdf(x, alpha * 2.0, alpha * 2.0));
        assert!(
            wrong > ks_critical(DRAWS),
            "α={alpha}: wrong α not rejected (D={wrong})"
        );
    }
}

/// Chi-square (df = n − 1) of the value at position 0 over many permutations.
fn position0_chi_square(draw: impl Fn(&mut dyn rand::RngCore) -> Vec<u32>, n: usize) -> f64 {
    const DRAWS: usize = 20_000;
    let mut rng = common::rng(7);
    let mut counts = vec![0usize; n];
    for _ in 0..DRAWS {
        let p = draw(&mut rng);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..n as u32).collect::<Vec<_>>(),
            "not a permutation"
        );
        counts[p[0] as usize] += 1;
    }
    let expected = DRAWS as f64 / n as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - expected).powi(2) / expected)
        .sum()
}

#[test]
fn permutation_position_zero_is_uniform() {
    // χ²(9) critical value at p = 0.001.
    const CRITICAL: f64 = 27.877;
    let chi = position0_chi_square(|rng| permutation(rng, 10), 10);
    assert!(chi < CRITICAL, "plain permutation χ² = {chi}");
}

#[test]
fn fixed_point_avoiding_permutation_rarely_keeps_fixed_points() {
    let mut rng = common::rng(8);
    let with_fixed = (0..2_000)
        .filter(|_| {
            let p = permutation_avoiding_fixed_points(&mut rng, 16);
            p.iter().enumerate().any(|(i, &v)| i as u32 == v)
        })
        .count();
    // A plain permutation has a fixed point with probability ≈ 1 − 1/e ≈ 0.63;
    // after 1 + 10 draws ≈ 0.63^11 ≈ 0.006.
    assert!(with_fixed < 60, "{with_fixed} of 2000 kept a fixed point");
}
