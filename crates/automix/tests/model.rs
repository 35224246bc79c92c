//! AutoMix / SAMix model behaviour on tiny networks (CPU, a few images).

use std::collections::HashMap;

use automix::{AutoMixConfig, AutoMixModel, HeadWeights, EVAL_HEADS};
use backbones::CifarResNetConfig;
use candle_core::{Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn tiny() -> CifarResNetConfig {
    CifarResNetConfig {
        base_width: 8,
        stage_blocks: Some([1, 1, 1, 1]),
        ..Default::default()
    }
}

fn batch(n: usize, seed: u64) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    use rand::Rng;
    let pixels: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    (
        Tensor::from_vec(pixels, (n, 3, 32, 32), &dev).unwrap(),
        Tensor::new(labels.as_slice(), &dev).unwrap(),
    )
}

fn snapshot(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn all_state(model: &AutoMixModel) -> Vec<(String, Tensor)> {
    model
        .varmaps()
        .iter()
        .flat_map(|(prefix, vm)| train::checkpoint::varmap_tensors(vm, prefix))
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect()
}

#[test]
fn k_side_starts_as_copy_and_changes_only_by_ema() {
    for cfg in [AutoMixConfig::automix(), AutoMixConfig::samix()] {
        let model = AutoMixModel::new(cfg.clone(), tiny(), &Device::Cpu, 7).unwrap();
        let q0 = snapshot(&model.q_vars());
        let k0 = snapshot(&model.k_vars());
        assert_eq!(q0.len(), k0.len());
        for (name, t) in &k0 {
            let q_name = name.replacen("model_k.", "model_q.", 1);
            assert_eq!(max_abs_diff(t, &q0[&q_name]), 0.0, "{name} not copied");
        }

        let mut sgd = model.new_optimizer().unwrap();
        let names = sgd.var_names();
        assert_eq!(names.len(), q0.len() + model.mixblock_vars().len());
        assert!(names
            .iter()
            .all(|n| !n.starts_with("model_k.") && !backbones::is_buffer(n)));
        let groups = model.optimizer_groups();
        assert_eq!(groups.len(), 2);
        assert!(groups[1]
            .vars
            .iter()
            .all(|(n, _)| n.starts_with("mixblock.")));
        let (x, y) = batch(6, 1);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let out = model.train_step(&x, &y, &mut rng).unwrap();
        let grads = out.gradients().unwrap();
        for (name, v) in model.k_vars() {
            assert!(grads.get(v.as_tensor()).is_none(), "gradient for {name}");
        }
        for (name, v) in model.q_vars().iter().chain(model.mixblock_vars().iter()) {
            assert!(grads.get(v.as_tensor()).is_some(), "no gradient for {name}");
        }
        sgd.step(&grads, 0.1).unwrap();
        // The optimizer step does not touch k (its forwards updated only BN buffers).
        let k_after_step = snapshot(&model.k_vars());
        for (name, t) in &k0 {
            assert_eq!(max_abs_diff(t, &k_after_step[name]), 0.0, "{name} moved");
        }
        let q1 = snapshot(&model.q_vars());
        let m = 0.9;
        model.momentum_update(m).unwrap();
        let k1 = snapshot(&model.k_vars());
        let mut moved = 0;
        for (name, k_new) in &k1 {
            let q_name = name.replacen("model_k.", "model_q.", 1);
            let expected =
                ((&k0[name] * m).unwrap() + (&q1[&q_name] * (1.0 - m)).unwrap()).unwrap();
            assert!(
                max_abs_diff(k_new, &expected) < 1e-6,
                "{name}: EMA mismatch"
            );
            if max_abs_diff(k_new, &k0[name]) > 0.0 {
                moved += 1;
            }
        }
        assert!(moved > 0, "EMA changed nothing");
    }
}

#[test]
fn mixblock_gradient_comes_only_from_mix_k_and_mask_loss() {
    let cfg = AutoMixConfig::samix();
    let model = AutoMixModel::new(cfg, tiny(), &Device::Cpu, 3).unwrap();
    let (x, y) = batch(6, 4);
    let mb = model.mixblock_vars();
    let q = model.q_vars();

    let out = model
        .train_step(&x, &y, &mut ChaCha8Rng::seed_from_u64(5))
        .unwrap();
    // q terms reach only q.
    let g = out.gradients_of(&out.loss_q).unwrap();
    assert!(mb.iter().all(|(_, v)| g.get(v.as_tensor()).is_none()));
    assert!(q.iter().all(|(_, v)| g.get(v.as_tensor()).is_some()));
    // MixBlock terms reach only the MixBlock.
    let g = out.gradients_of(&out.loss_mixblock).unwrap();
    assert!(q.iter().all(|(_, v)| g.get(v.as_tensor()).is_none()));
    let nonzero = |g: &candle_core::backprop::GradStore| {
        mb.iter()
            .filter(|(_, v)| {
                g.get(v.as_tensor())
                    .map(|t| max_abs_diff(t, &t.zeros_like().unwrap()) > 0.0)
                    .unwrap_or(false)
            })
            .count()
    };
    assert!(nonzero(&g) > 0);

    // Each of the two terms alone reaches the MixBlock; with both weights zero nothing does.
    for (mix_k, mask_w, expect_grad) in [(1.0, 0.0, true), (0.0, 0.1, true), (0.0, 0.0, false)] {
        let cfg = AutoMixConfig {
            head_weights: HeadWeights {
                mix_k,
                ..HeadWeights::default()
            },
            mask_loss_weight: mask_w,
            // Force the L1 term out of its dead zone whatever λ_mb is.
            mask_loss_margin: 0.0,
            ..AutoMixConfig::samix()
        };
        let model = AutoMixModel::new(cfg, tiny(), &Device::Cpu, 3).unwrap();
        let mb = model.mixblock_vars();
        let out = model
            .train_step(&x, &y, &mut ChaCha8Rng::seed_from_u64(5))
            .unwrap();
        let g = out.gradients().unwrap();
        let count = mb
            .iter()
            .filter(|(_, v)| {
                g.get(v.as_tensor())
                    .map(|t| max_abs_diff(t, &t.zeros_like().unwrap()) > 0.0)
                    .unwrap_or(false)
            })
            .count();
        assert_eq!(
            count > 0,
            expect_grad,
            "mix_k={mix_k} mask={mask_w}: {count}"
        );
    }
}

#[test]
fn lam_margin_flag_follows_lambda_bb() {
    let cfg = AutoMixConfig {
        lam_margin: 0.49,
        ..AutoMixConfig::automix()
    };
    let model = AutoMixModel::new(cfg, tiny(), &Device::Cpu, 1).unwrap();
    let (x, y) = batch(4, 9);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for _ in 0..3 {
        let out = model.train_step(&x, &y, &mut rng).unwrap();
        let expected = out.lambda_bb <= 0.49 || 1.0 - out.lambda_bb <= 0.49;
        assert_eq!(out.lam_margin_applied, expected, "λ_bb = {}", out.lambda_bb);
        assert!(!out.mask_adjusted, "AutoMix never adjusts");
    }
}

#[test]
fn samix_mask_adjust_fires_at_probability_one() {
    let cfg = AutoMixConfig {
        mask_adjust: Some(1.0),
        ..AutoMixConfig::samix()
    };
    let model = AutoMixModel::new(cfg, tiny(), &Device::Cpu, 1).unwrap();
    let (x, y) = batch(4, 9);
    let out = model
        .train_step(&x, &y, &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert!(out.mask_adjusted);
}

#[test]
fn eval_has_four_heads_and_changes_nothing() {
    let model = AutoMixModel::new(AutoMixConfig::samix(), tiny(), &Device::Cpu, 5).unwrap();
    let (x, y) = batch(4, 2);
    // One train step so that q and k differ and BN statistics are not at their initial values.
    let mut sgd = model.new_optimizer().unwrap();
    let out = model
        .train_step(&x, &y, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    sgd.step(&out.gradients().unwrap(), 0.1).unwrap();
    model.momentum_update(0.5).unwrap();

    let before = all_state(&model);
    let heads = model.eval_logits(&x).unwrap();
    let names: Vec<&str> = heads.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, EVAL_HEADS);
    for (_, logits) in &heads {
        assert_eq!(logits.dims(), &[4, 10]);
    }
    let preview = model
        .masks_for_preview(&x, &y, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    let (mask, mixed) = (preview.mask.unwrap(), preview.images);
    let lam = match preview.labels.lambda {
        mix_ops::Lambda::Scalar(l) => l,
        mix_ops::Lambda::PerSample(_) => panic!("one λ per batch"),
    };
    assert_eq!(mask.dims(), &[4, 1, 32, 32]);
    assert_eq!(mixed.dims(), x.dims());
    assert!(lam > 0.0 && lam < 1.0);
    let min = mask.min_all().unwrap().to_scalar::<f32>().unwrap();
    let max = mask.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(min > 0.0 && max < 1.0);
    let after = all_state(&model);
    for ((name, a), (_, b)) in before.iter().zip(after.iter()) {
        assert_eq!(
            max_abs_diff(a, b),
            0.0,
            "{name} changed during eval/preview"
        );
    }
}

#[test]
fn checkpoint_round_trip_restores_every_head() {
    let a = AutoMixModel::new(AutoMixConfig::automix(), tiny(), &Device::Cpu, 1).unwrap();
    let (x, y) = batch(4, 3);
    let mut sgd = a.new_optimizer().unwrap();
    let out = a
        .train_step(&x, &y, &mut ChaCha8Rng::seed_from_u64(0))
        .unwrap();
    sgd.step(&out.gradients().unwrap(), 0.1).unwrap();
    a.momentum_update(0.9).unwrap();

    let saved: HashMap<String, Tensor> = all_state(&a).into_iter().collect();
    assert!(saved
        .keys()
        .any(|k| k.starts_with("model_k.") && k.ends_with("running_var")));
    assert!(saved.keys().any(|k| k.starts_with("model_q.head_mix.")));
    assert!(saved.keys().any(|k| k.starts_with("mixblock.query.")));
    let b = AutoMixModel::new(AutoMixConfig::automix(), tiny(), &Device::Cpu, 99).unwrap();
    for (prefix, vm) in b.varmaps() {
        train::checkpoint::load_varmap(vm, &saved, prefix, std::path::Path::new("mem")).unwrap();
    }
    for ((na, la), (_, lb)) in a
        .eval_logits(&x)
        .unwrap()
        .iter()
        .zip(b.eval_logits(&x).unwrap().iter())
    {
        assert_eq!(max_abs_diff(la, lb), 0.0, "{na} differs after reload");
    }
}

#[test]
fn few_steps_train_and_stay_finite() {
    // AutoMix long enough to see learning; SAMix only a few steps (CPU backward is slow).
    for (cfg, total) in [(AutoMixConfig::automix(), 8), (AutoMixConfig::samix(), 3)] {
        let model = AutoMixModel::new(cfg.clone(), tiny(), &Device::Cpu, 0).unwrap();
        let mut sgd = model.new_optimizer().unwrap();
        let (x, y) = batch(8, 6);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut one_q = Vec::new();
        for it in 0..total {
            let out = model.train_step(&x, &y, &mut rng).unwrap();
            let values: HashMap<&str, f64> = out.log_values().unwrap().into_iter().collect();
            for (k, v) in &values {
                assert!(v.is_finite(), "{:?} step {it}: {k} = {v}", cfg.variant);
                if k.starts_with("acc") {
                    assert!((0.0..=100.0).contains(v), "{k} = {v}");
                }
            }
            one_q.push(values["loss_one_q"]);
            let grads = out.gradients().unwrap();
            sgd.step(&grads, 0.1).unwrap();
            model.momentum_update(model.momentum_at(it, total)).unwrap();
        }
        if total >= 8 {
            // Same batch every step: the clean q loss must fall.
            let first = (one_q[0] + one_q[1]) / 2.0;
            let last = (one_q[total - 2] + one_q[total - 1]) / 2.0;
            assert!(last < first, "{:?}: loss_one_q {one_q:?}", cfg.variant);
        }
    }
}

#[test]
fn samix_value_neck_is_upstreams_128_wide_at_base_width_16() {
    // Upstream's SAMix config fixes `hid_channels = 128`; at base width 16 the MixBlock input
    // has 64 channels, so the hidden width is not C/2 = 32.
    let net = CifarResNetConfig {
        base_width: 16,
        stage_blocks: Some([1, 1, 1, 1]),
        ..Default::default()
    };
    let shape = |cfg: AutoMixConfig, name: &str| {
        let model = AutoMixModel::new(cfg, net, &Device::Cpu, 0).unwrap();
        let (_, vm) = model.varmaps()[2];
        let data = vm.data().lock().unwrap();
        data[name].as_tensor().dims().to_vec()
    };
    let samix = AutoMixConfig::samix();
    assert_eq!(
        shape(samix.clone(), "value_neck.conv1.weight"),
        [128, 64, 1, 1]
    );
    assert_eq!(shape(samix.clone(), "value_neck.bn.running_var"), [128]);
    assert_eq!(shape(samix, "value_neck.conv2.weight"), [1, 128, 1, 1]);
    // A config can ask for another width (e.g. to load a checkpoint made with C/2).
    let narrow = AutoMixConfig {
        value_neck_channels: Some(32),
        ..AutoMixConfig::samix()
    };
    assert_eq!(shape(narrow, "value_neck.conv1.weight"), [32, 64, 1, 1]);
}
