//! CIFAR backbone tests: sizes, BatchNorm semantics, initialization, the
//! ManifoldMix hook and stage-wise forwards. All on tiny widths.

use backbones::{
    is_buffer, param_count, Arch, BatchNorm2d, CifarResNet, CifarResNetConfig, InitScheme,
    ParamRegistry,
};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use mix_ops::mixup::mixup_blend;
use mix_ops::FeatureMix;

fn tiny(arch: Arch, base_width: usize) -> CifarResNetConfig {
    CifarResNetConfig {
        arch,
        base_width,
        stage_blocks: Some([1, 1, 1, 1]),
        num_classes: 10,
        init: InitScheme::Benchmark,
    }
}

fn build(cfg: CifarResNetConfig, seed: u64) -> (VarMap, CifarResNet) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = CifarResNet::new(cfg, vb).unwrap();
    net.init_weights(&varmap, seed).unwrap();
    (varmap, net)
}

fn var(varmap: &VarMap, name: &str) -> Tensor {
    varmap
        .data()
        .lock()
        .unwrap()
        .get(name)
        .unwrap_or_else(|| panic!("no variable {name}"))
        .as_tensor()
        .clone()
}

fn images(n: usize, seed: u64) -> Tensor {
    // Deterministic pseudo-images without touching candle's RNG.
    let v: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
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

fn std_of(t: &Tensor) -> f64 {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

#[test]
fn parameter_counts_match_the_spec() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    CifarResNet::new(CifarResNetConfig::default(), vb).unwrap();
    assert_eq!(param_count(&varmap), 11_173_962);

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let rx = CifarResNet::new(CifarResNetConfig::resnext50(), vb).unwrap();
    assert_eq!(param_count(&varmap), 22_992_714);
    assert_eq!(rx.config().groups(), 32);
    assert_eq!(rx.feature_channels(3), 1024);
    assert_eq!(rx.feature_channels(4), 2048);
    // Grouped conv: 128 mid channels in 32 groups → 4 inputs per group.
    assert_eq!(
        var(&varmap, "layer1.0.conv2.weight").dims(),
        &[128, 4, 3, 3]
    );
}

#[test]
fn buffers_are_named_and_excluded_from_the_count() {
    let (varmap, net) = build(tiny(Arch::ResNet18, 4), 0);
    assert!(is_buffer("layer1.0.bn1.running_mean"));
    assert!(is_buffer("model.bn1.running_var"));
    assert!(!is_buffer("bn1.weight"));
    let data = varmap.data().lock().unwrap();
    let total: usize = data.values().map(|v| v.elem_count()).sum();
    let buffers: usize = data
        .iter()
        .filter(|(k, _)| is_buffer(k))
        .map(|(_, v)| v.elem_count())
        .sum();
    assert!(data.contains_key("layer2.0.downsample.1.running_var"));
    assert!(data.contains_key("fc.bias"));
    assert!(buffers > 0);
    drop(data);
    assert_eq!(param_count(&varmap), total - buffers);
    assert_eq!(net.var_specs().len(), varmap.all_vars().len());
}

#[test]
fn output_shapes() {
    for (arch, chans) in [
        (Arch::ResNet18, [8, 8, 16, 32, 64]),
        (Arch::ResNeXt50, [8, 32, 64, 128, 256]),
    ] {
        let (_vm, net) = build(tiny(arch, 8), 1);
        let x = images(2, 0);
        assert_eq!(net.forward_t(&x, true).unwrap().dims(), &[2, 10]);
        let sides = [32, 32, 16, 8, 4];
        for s in 0..=4 {
            assert_eq!(net.feature_channels(s), chans[s]);
            let z = net.forward_until(&x, s, false).unwrap();
            assert_eq!(
                z.dims(),
                &[2, chans[s], sides[s], sides[s]],
                "{arch:?} stage {s}"
            );
        }
        assert_eq!(
            net.features(&x, false).unwrap().dims(),
            &[2, chans[4], 4, 4]
        );
        assert_eq!(net.num_classes(), 10);
    }
}

#[test]
fn batch_norm_train_and_eval_follow_pytorch() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut reg = ParamRegistry::new(InitScheme::Benchmark);
    let bn = BatchNorm2d::new(2, false, vb.pp("bn"), &mut reg).unwrap();
    reg.init_weights(&varmap, 0).unwrap();
    // 2 images × 2 channels × 1×2 pixels.
    let vals = [1f32, 2., 10., 20., 3., 6., 30., 40.];
    let x = Tensor::from_vec(vals.to_vec(), (2, 2, 1, 2), &Device::Cpu).unwrap();
    let y = bn.forward_t(&x, true).unwrap();

    let ch = |c: usize| -> Vec<f64> {
        (0..2)
            .flat_map(|n| (0..2).map(move |p| vals[n * 4 + c * 2 + p] as f64))
            .collect()
    };
    let y_v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let rm: Vec<f32> = var(&varmap, "bn.running_mean").to_vec1().unwrap();
    let rv: Vec<f32> = var(&varmap, "bn.running_var").to_vec1().unwrap();
    for c in 0..2 {
        let v = ch(c);
        let mean = v.iter().sum::<f64>() / 4.0;
        let ss = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
        let (biased, unbiased) = (ss / 4.0, ss / 3.0);
        assert!(
            (rm[c] as f64 - 0.1 * mean).abs() < 1e-5,
            "running mean c{c}"
        );
        assert!(
            (rv[c] as f64 - (0.9 + 0.1 * unbiased)).abs() < 1e-4,
            "running var c{c}"
        );
        for n in 0..2 {
            for p in 0..2 {
                let xv = vals[n * 4 + c * 2 + p] as f64;
                let want = (xv - mean) / (biased + 1e-5).sqrt();
                let got = y_v[n * 4 + c * 2 + p] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "train output c{c}: {got} vs {want}"
                );
            }
        }
    }

    // Eval: uses the running statistics and leaves them alone.
    let y_eval = bn.forward_t(&x, false).unwrap();
    let y_eval: Vec<f32> = y_eval.flatten_all().unwrap().to_vec1().unwrap();
    let rm2: Vec<f32> = var(&varmap, "bn.running_mean").to_vec1().unwrap();
    let rv2: Vec<f32> = var(&varmap, "bn.running_var").to_vec1().unwrap();
    assert_eq!(rm, rm2);
    assert_eq!(rv, rv2);
    for (i, &xv) in vals.iter().enumerate() {
        let c = (i / 2) % 2;
        let want = (xv as f64 - rm[c] as f64) / (rv[c] as f64 + 1e-5).sqrt();
        assert!((y_eval[i] as f64 - want).abs() < 1e-4);
    }

    // A second training step compounds with momentum 0.1.
    bn.forward_t(&x, true).unwrap();
    let rm3: Vec<f32> = var(&varmap, "bn.running_mean").to_vec1().unwrap();
    let mean0 = ch(0).iter().sum::<f64>() / 4.0;
    assert!((rm3[0] as f64 - (0.9 * 0.1 * mean0 + 0.1 * mean0)).abs() < 1e-4);
}

#[test]
fn network_running_stats_move_only_in_train_mode() {
    let (varmap, net) = build(tiny(Arch::ResNet18, 4), 2);
    let x = images(3, 1);
    let before = var(&varmap, "layer3.0.bn1.running_var")
        .to_vec1::<f32>()
        .unwrap();
    net.forward_t(&x, false).unwrap();
    let after_eval = var(&varmap, "layer3.0.bn1.running_var")
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(before, after_eval);
    net.forward_t(&x, true).unwrap();
    let after_train = var(&varmap, "layer3.0.bn1.running_var")
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(before, after_train);
}

#[test]
fn benchmark_init_statistics() {
    let cfg = CifarResNetConfig {
        base_width: 16,
        ..tiny(Arch::ResNet18, 16)
    };
    let (varmap, _net) = build(cfg, 3);
    // layer4 convs: 128 out channels, 3×3.
    let w = var(&varmap, "layer4.0.conv2.weight");
    let want = (2.0 / (9.0 * 128.0f64)).sqrt();
    let got = std_of(&w);
    assert!((got / want - 1.0).abs() < 0.03, "conv std {got} vs {want}");
    let fc = var(&varmap, "fc.weight");
    assert!(
        (std_of(&fc) / 0.01 - 1.0).abs() < 0.1,
        "fc std {}",
        std_of(&fc)
    );
    let fc_b: Vec<f32> = var(&varmap, "fc.bias").to_vec1().unwrap();
    assert!(fc_b.iter().all(|&b| b == 0.0));
    for l in 1..=4 {
        let z: Vec<f32> = var(&varmap, &format!("layer{l}.0.bn2.weight"))
            .to_vec1()
            .unwrap();
        assert!(
            z.iter().all(|&v| v == 0.0),
            "layer{l} bn2 should be zero-init"
        );
        let o: Vec<f32> = var(&varmap, &format!("layer{l}.0.bn1.weight"))
            .to_vec1()
            .unwrap();
        assert!(o.iter().all(|&v| v == 1.0));
    }
    let ds: Vec<f32> = var(&varmap, "layer2.0.downsample.1.weight")
        .to_vec1()
        .unwrap();
    assert!(
        ds.iter().all(|&v| v == 1.0),
        "downsample BN is not zero-init"
    );

    // ResNeXt: bn3 is the residual BN; fan-out is not divided by groups.
    let (varmap, net) = build(tiny(Arch::ResNeXt50, 16), 4);
    assert_eq!(net.config().groups(), 32);
    let z: Vec<f32> = var(&varmap, "layer2.0.bn3.weight").to_vec1().unwrap();
    assert!(z.iter().all(|&v| v == 0.0));
    let z: Vec<f32> = var(&varmap, "layer2.0.bn2.weight").to_vec1().unwrap();
    assert!(z.iter().all(|&v| v == 1.0));
    let w = var(&varmap, "layer4.0.conv2.weight"); // 256 out, grouped
    let want = (2.0 / (9.0 * 256.0f64)).sqrt();
    assert!((std_of(&w) / want - 1.0).abs() < 0.05);
}

#[test]
fn pytorch_default_init_bounds() {
    let cfg = CifarResNetConfig {
        init: InitScheme::PytorchDefault,
        ..tiny(Arch::ResNet18, 8)
    };
    let (varmap, _net) = build(cfg, 5);
    let w: Vec<f32> = var(&varmap, "layer2.0.conv1.weight")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bound = 1.0 / ((8 * 9) as f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    // Uniform on ±b has std b/√3.
    let std = std_of(&var(&varmap, "layer2.0.conv1.weight"));
    assert!((std / (bound as f64 / 3f64.sqrt()) - 1.0).abs() < 0.1);
    let z: Vec<f32> = var(&varmap, "layer1.0.bn2.weight").to_vec1().unwrap();
    assert!(z.iter().all(|&v| v == 1.0), "no zero-init residual");
    let b: Vec<f32> = var(&varmap, "fc.bias").to_vec1().unwrap();
    assert!(b.iter().any(|&v| v != 0.0));
    assert!(b.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt()));
}

#[test]
fn init_is_a_function_of_the_seed() {
    let (a, _) = build(tiny(Arch::ResNeXt50, 8), 7);
    let (b, _) = build(tiny(Arch::ResNeXt50, 8), 7);
    let (c, _) = build(tiny(Arch::ResNeXt50, 8), 8);
    let names: Vec<String> = a.data().lock().unwrap().keys().cloned().collect();
    let mut differs = false;
    for n in &names {
        assert_eq!(max_abs_diff(&var(&a, n), &var(&b, n)), 0.0, "{n}");
        differs |= max_abs_diff(&var(&a, n), &var(&c, n)) > 0.0;
    }
    assert!(differs);
}

#[test]
fn manifold_mix_at_layer_zero_is_input_mixup() {
    let (_vm, net) = build(tiny(Arch::ResNet18, 4), 9);
    let x = images(4, 2);
    let perm = Tensor::new(&[2u32, 3, 0, 1], &Device::Cpu).unwrap();
    let mix = FeatureMix {
        layer: 0,
        lambda: 0.3,
        perm: perm.clone(),
    };
    let got = net.forward_mix(&x, false, Some(&mix)).unwrap();
    let want = net
        .forward_t(&mixup_blend(&x, &perm, 0.3).unwrap(), false)
        .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-5);
    let plain = net.forward_mix(&x, false, None).unwrap();
    assert!(max_abs_diff(&plain, &ModuleT::forward_t(&net, &x, false).unwrap()) == 0.0);
}

#[test]
fn manifold_mix_at_layer_one_mixes_features_with_gradient_to_both() {
    let (_vm, net) = build(tiny(Arch::ResNet18, 4), 10);
    let x = Var::from_tensor(&images(4, 3)).unwrap();
    let perm = Tensor::new(&[1u32, 0, 3, 2], &Device::Cpu).unwrap();
    let mix = FeatureMix {
        layer: 1,
        lambda: 0.6,
        perm: perm.clone(),
    };
    let plain = net.forward_t(x.as_tensor(), false).unwrap();
    let mixed = net.forward_mix(x.as_tensor(), false, Some(&mix)).unwrap();
    assert!(max_abs_diff(&plain, &mixed) > 1e-4);
    // Equals mixing layer1's output by hand and continuing.
    let z = net.forward_until(x.as_tensor(), 1, false).unwrap();
    let by_hand = net
        .forward_from(&mixup_blend(&z, &perm, 0.6).unwrap(), 1, false)
        .unwrap();
    assert!(max_abs_diff(&mixed, &by_hand) < 1e-5);

    // Eval mode keeps samples independent: the logits of sample 0 depend on
    // image 1 only through the mix.
    let grad_norms = |logits: &Tensor| -> Vec<f32> {
        let loss = logits.get(0).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        (0..4)
            .map(|i| {
                g.get(i)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let g_plain = grad_norms(&plain);
    assert!(g_plain[0] > 0.0 && g_plain[1] == 0.0);
    let g_mix = grad_norms(&mixed);
    assert!(g_mix[0] > 0.0, "gradient through z");
    assert!(g_mix[1] > 0.0, "gradient through z[π]");
    assert_eq!(g_mix[2], 0.0);
}

#[test]
fn manifold_mix_rejects_bad_instructions() {
    let (_vm, net) = build(tiny(Arch::ResNet18, 4), 11);
    let x = images(2, 4);
    let perm = Tensor::new(&[1u32, 0], &Device::Cpu).unwrap();
    let bad_layer = FeatureMix {
        layer: 4,
        lambda: 0.5,
        perm,
    };
    let err = net.forward_mix(&x, true, Some(&bad_layer)).unwrap_err();
    assert!(err.to_string().contains("layer"), "{err}");
    let bad_perm = FeatureMix {
        layer: 1,
        lambda: 0.5,
        perm: Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap(),
    };
    assert!(net.forward_mix(&x, true, Some(&bad_perm)).is_err());
}

#[test]
fn stagewise_forward_matches_full_forward() {
    for arch in [Arch::ResNet18, Arch::ResNeXt50] {
        let (_vm, net) = build(tiny(arch, 8), 12);
        let x = images(2, 5);
        let full = net.forward_t(&x, false).unwrap();
        for s in 0..=4 {
            let z = net.forward_until(&x, s, false).unwrap();
            let logits = net.forward_from(&z, s, false).unwrap();
            assert!(max_abs_diff(&full, &logits) < 1e-5, "{arch:?} stage {s}");
        }
        assert!(net.forward_until(&x, 5, false).is_err());
    }
}
