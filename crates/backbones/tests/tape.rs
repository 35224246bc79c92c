//! The taped training forward (`CifarResNet::forward_train`) against candle's autograd on the
//! same network: same logits, same running statistics, and every parameter gradient equal bit
//! for bit (both run the same ops; only who adds the contributions differs, and `0 + a = a`).

use backbones::{is_buffer, Arch, CifarResNet, CifarResNetConfig, DetachedVarMap, InitScheme};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mix_ops::FeatureMix;

fn config(arch: Arch, base_width: usize, blocks: [usize; 4]) -> CifarResNetConfig {
    CifarResNetConfig {
        arch,
        base_width,
        stage_blocks: Some(blocks),
        num_classes: 10,
        init: InitScheme::Benchmark,
    }
}

fn build(arch: Arch, base_width: usize, blocks: [usize; 4]) -> Result<(VarMap, CifarResNet)> {
    let cfg = config(arch, base_width, blocks);
    let varmap = VarMap::new();
    let net = CifarResNet::new(
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    net.init_weights(&varmap, 11)?;
    // The benchmark zero-initialises each residual branch's last BN; give every BN weight a
    // non-zero value so that every path carries gradient.
    let mut i = 0u64;
    for (name, v) in varmap.data().lock().unwrap().iter() {
        if name.ends_with("weight") && name.contains("bn") {
            i += 1;
            let c = v.elem_count();
            v.set(&(Tensor::randn(0f32, 0.3, c, &Device::Cpu)? + (1.0 + 0.01 * i as f64))?)?;
        }
    }
    Ok((varmap, net))
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(v.iter().map(|x| x.to_bits()).collect())
}

/// Running statistics of the whole network, in name order.
fn buffers(varmap: &VarMap) -> Result<Vec<(String, Vec<u32>)>> {
    let data = varmap.data().lock().unwrap();
    let mut out: Vec<(String, Vec<u32>)> = data
        .iter()
        .filter(|(n, _)| is_buffer(n))
        .map(|(n, v)| Ok((n.clone(), bits(v.as_tensor())?)))
        .collect::<Result<_>>()?;
    out.sort();
    Ok(out)
}

fn check(arch: Arch, base_width: usize, blocks: [usize; 4], input_grad: bool) -> Result<()> {
    let what = format!("{arch:?} width {base_width} blocks {blocks:?}");
    let (varmap, net) = build(arch, base_width, blocks)?;
    let x0 = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let probe = Tensor::randn(0f32, 1.0, (4, 10), &Device::Cpu)?;
    let input = Var::from_tensor(&x0)?;
    let x = if input_grad {
        input.as_tensor().clone()
    } else {
        x0.clone()
    };
    let before = buffers(&varmap)?;

    let logits_a = net.forward_mix(&x, true, None)?;
    let grads_a = (&logits_a * &probe)?.sum_all()?.backward()?;
    let after_a = buffers(&varmap)?;
    // Put the running statistics back so the second forward updates the same values.
    for (name, v) in varmap.data().lock().unwrap().iter() {
        if let Some((_, b)) = before.iter().find(|(n, _)| n == name) {
            let vals: Vec<f32> = b.iter().map(|u| f32::from_bits(*u)).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu)?)?;
        }
    }

    let (logits_b, taped) = net.forward_train(&x, None)?;
    let taped = taped.expect("the tape applies to f32 CPU tensors without feature mix");
    let mut grads_b: GradStore = (&logits_b * &probe)?.sum_all()?.backward()?;
    assert!(!taped.is_empty(), "{what}: backward filled the tape");
    taped.add_to(&mut grads_b)?;
    assert!(taped.is_empty());

    assert_eq!(bits(&logits_a)?, bits(&logits_b)?, "{what}: logits");
    assert_eq!(after_a, buffers(&varmap)?, "{what}: running statistics");
    let data = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (name, v) in data.iter().filter(|(n, _)| !is_buffer(n)) {
        let a = grads_a
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: autograd {name}"));
        let b = grads_b
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: taped {name}"));
        assert_eq!(bits(a)?, bits(b)?, "{what}: gradient of {name}");
        checked += 1;
    }
    assert!(checked > 10, "{what}: {checked} parameters");
    if input_grad {
        let a = grads_a
            .get(input.as_tensor())
            .expect("autograd input gradient");
        let b = grads_b
            .get(input.as_tensor())
            .expect("taped input gradient");
        assert_eq!(bits(a)?, bits(b)?, "{what}: input gradient");
    } else {
        assert!(
            grads_b.get(&x).is_none(),
            "{what}: no gradient for the images"
        );
    }
    Ok(())
}

#[test]
fn taped_resnet18_gradients_equal_autograd() -> Result<()> {
    // Two blocks in the first stage: an identity shortcut as well as projections.
    check(Arch::ResNet18, 8, [2, 1, 1, 1], false)?;
    check(Arch::ResNet18, 8, [1, 2, 1, 1], true)
}

#[test]
fn taped_resnext50_gradients_equal_autograd() -> Result<()> {
    // Grouped 3×3 convolutions need 32 | mid channels: base width 16 gives 32 at stage 1.
    check(Arch::ResNeXt50, 16, [2, 1, 1, 1], false)
}

#[test]
fn feature_mix_falls_back_to_autograd() -> Result<()> {
    let (_, net) = build(Arch::ResNet18, 4, [1, 1, 1, 1])?;
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let mix = FeatureMix {
        layer: 2,
        lambda: 0.3,
        perm: Tensor::new(&[1u32, 0, 3, 2], &Device::Cpu)?,
    };
    let (logits, taped) = net.forward_train(&x, Some(&mix))?;
    assert!(
        taped.is_none(),
        "feature mix runs through candle's autograd"
    );
    let expected = net.forward_mix(&x, true, Some(&mix))?;
    assert_eq!(logits.dims(), expected.dims());
    Ok(())
}

#[test]
fn a_taped_forward_backs_up_once() -> Result<()> {
    let (_, net) = build(Arch::ResNet18, 4, [1, 1, 1, 1])?;
    let x = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let (logits, _taped) = net.forward_train(&x, None)?;
    let loss = logits.sum_all()?;
    loss.backward()?;
    let err = loss.backward().unwrap_err();
    assert!(format!("{err}").contains("twice"), "{err}");
    Ok(())
}

/// The network over detached views of `varmap`'s weights (as PuzzleMix's saliency pass and
/// AutoMix's momentum encoder use it).
fn frozen_view(
    varmap: &VarMap,
    arch: Arch,
    base_width: usize,
    blocks: [usize; 4],
) -> Result<CifarResNet> {
    let vb = DetachedVarMap::new(varmap.clone()).into_var_builder(DType::F32, &Device::Cpu);
    CifarResNet::new(config(arch, base_width, blocks), vb)
}

fn restore_buffers(varmap: &VarMap, saved: &[(String, Vec<u32>)]) -> Result<()> {
    for (name, v) in varmap.data().lock().unwrap().iter() {
        if let Some((_, b)) = saved.iter().find(|(n, _)| n == name) {
            let vals: Vec<f32> = b.iter().map(|u| f32::from_bits(*u)).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

/// A frozen network's taped forward (training mode: `features_train`, evaluation mode:
/// `forward_eval`) gives the input the same gradient as candle's autograd, bit for bit, the
/// same logits and running statistics, and no parameter any gradient.
fn check_frozen(arch: Arch, base_width: usize, blocks: [usize; 4], train: bool) -> Result<()> {
    let what = format!("{arch:?} width {base_width} blocks {blocks:?} train={train}");
    let (varmap, _) = build(arch, base_width, blocks)?;
    let frozen = frozen_view(&varmap, arch, base_width, blocks)?;
    // Non-trivial running statistics, as after some training.
    frozen.forward_t(
        &Tensor::randn(0.5f32, 2.0, (6, 3, 16, 16), &Device::Cpu)?,
        true,
    )?;
    let x0 = Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?;
    let probe = Tensor::randn(0f32, 1.0, (4, 10), &Device::Cpu)?;
    let input = Var::from_tensor(&x0)?;
    let x = input.as_tensor();
    let before = buffers(&varmap)?;

    let logits_a = frozen.forward_t(x, train)?;
    let grads_a = (&logits_a * &probe)?.sum_all()?.backward()?;
    let after_a = buffers(&varmap)?;
    restore_buffers(&varmap, &before)?;

    let (logits_b, taped) = if train {
        let (features, taped) = frozen.features_train(x)?;
        let taped = taped.expect("a frozen network tapes when its input needs a gradient");
        (frozen.head().forward(&features)?, Some(taped))
    } else {
        (frozen.forward_eval(x)?, None)
    };
    let loss_b = (&logits_b * &probe)?.sum_all()?;
    let grads_b = loss_b.backward()?;
    // Only a taped forward refuses a second backward: the tape did run.
    let again = loss_b.backward().map(|_| ()).unwrap_err();
    assert!(format!("{again}").contains("twice"), "{what}: {again}");
    if let Some(taped) = taped {
        assert!(
            taped.is_empty(),
            "{what}: a frozen network collects no weight gradient"
        );
    }
    assert_eq!(bits(&logits_a)?, bits(&logits_b)?, "{what}: logits");
    assert_eq!(after_a, buffers(&varmap)?, "{what}: running statistics");
    if !train {
        assert_eq!(
            before, after_a,
            "{what}: eval mode leaves the statistics alone"
        );
    }
    let a = grads_a.get(x).expect("autograd input gradient");
    let b = grads_b.get(x).expect("taped input gradient");
    assert_eq!(bits(a)?, bits(b)?, "{what}: input gradient");
    let data = varmap.data().lock().unwrap();
    for (name, v) in data.iter() {
        assert!(
            grads_b.get(v.as_tensor()).is_none(),
            "{what}: {name} got a gradient"
        );
    }
    Ok(())
}

#[test]
fn frozen_resnet18_tapes_the_input_gradient_alone() -> Result<()> {
    for train in [true, false] {
        check_frozen(Arch::ResNet18, 8, [2, 1, 1, 1], train)?;
    }
    Ok(())
}

#[test]
fn frozen_resnext50_tapes_the_input_gradient_alone() -> Result<()> {
    for train in [true, false] {
        check_frozen(Arch::ResNeXt50, 16, [1, 1, 1, 1], train)?;
    }
    Ok(())
}

#[test]
fn eval_forward_of_a_trained_network_keeps_autograd() -> Result<()> {
    // Trained weights: no tape (it would lose their gradients); candle's autograd gives them.
    let (varmap, net) = build(Arch::ResNet18, 4, [1, 1, 1, 1])?;
    let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 16, 16), &Device::Cpu)?)?;
    let logits = net.forward_eval(input.as_tensor())?;
    assert_eq!(
        bits(&logits)?,
        bits(&net.forward_t(input.as_tensor(), false)?)?
    );
    let grads = logits.sum_all()?.backward()?;
    assert!(grads.get(input.as_tensor()).is_some());
    let data = varmap.data().lock().unwrap();
    let trained = data.iter().filter(|(n, _)| !is_buffer(n));
    for (name, v) in trained {
        assert!(
            grads.get(v.as_tensor()).is_some(),
            "{name} lost its gradient"
        );
    }
    Ok(())
}
