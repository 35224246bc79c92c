//! Attention-network tests: strict torchvision-name loading, error messages,
//! CIFAR checkpoints as attention networks, and the §5.7 feature forward.

use std::collections::HashMap;
use std::path::PathBuf;

use backbones::{Arch, AttentionNet, CifarResNet, CifarResNetConfig, ImageNetResNet18};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

const WIDTH: usize = 4;

fn temp_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "backbones-test-{}-{tag}.safetensors",
        std::process::id()
    ))
}

/// A tiny torchvision-named ResNet-18 with seeded random weights, plus the
/// extra keys a real torchvision export carries (`fc.*`, `num_batches_tracked`).
fn tiny_imagenet_tensors() -> (HashMap<String, Tensor>, ImageNetResNet18) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = ImageNetResNet18::new(WIDTH, vb).unwrap();
    net.init_weights(&varmap, 3).unwrap();
    let mut map: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    // Running statistics that are not the 0/1 defaults, so a load that ignored
    // them would be caught by the output comparison.
    map.insert(
        "bn1.running_mean".into(),
        Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &Device::Cpu).unwrap(),
    );
    map.insert(
        "bn1.running_var".into(),
        Tensor::new(&[0.5f32, 2.0, 1.5, 1.0], &Device::Cpu).unwrap(),
    );
    map.insert(
        "fc.weight".into(),
        Tensor::zeros((1000, 8 * WIDTH), DType::F32, &Device::Cpu).unwrap(),
    );
    map.insert(
        "fc.bias".into(),
        Tensor::zeros(1000, DType::F32, &Device::Cpu).unwrap(),
    );
    map.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(&[7i64], &Device::Cpu)
            .unwrap()
            .squeeze(0)
            .unwrap(),
    );
    (map, net)
}

fn save(map: &HashMap<String, Tensor>, tag: &str) -> PathBuf {
    let path = temp_path(tag);
    candle_core::safetensors::save(map, &path).unwrap();
    path
}

fn inputs(n: usize, side: usize) -> Tensor {
    let v: Vec<f32> = (0..n * 3 * side * side)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (n, 3, side, side), &Device::Cpu).unwrap()
}

#[test]
fn loads_torchvision_names_and_reproduces_the_network() {
    let (map, _) = tiny_imagenet_tensors();
    let path = save(&map, "ok");
    let net = ImageNetResNet18::load(&path, None, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(net.base_width(), WIDTH);

    // Same network through a plain VarBuilder over the same tensors.
    let reference = ImageNetResNet18::new(
        WIDTH,
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let x = inputs(2, 64);
    let a = net.forward_t(&x, false).unwrap();
    let b = reference.forward_t(&x, false).unwrap();
    assert_eq!(a.dims(), &[2, 8 * WIDTH, 2, 2]);
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    std::fs::remove_file(path).ok();
}

#[test]
fn missing_key_is_named_with_the_file() {
    let (mut map, _) = tiny_imagenet_tensors();
    map.remove("layer3.1.bn2.running_var");
    let path = save(&map, "missing");
    let err = ImageNetResNet18::load(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer3.1.bn2.running_var"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    std::fs::remove_file(path).ok();
}

#[test]
fn wrong_shape_is_named() {
    let (mut map, _) = tiny_imagenet_tensors();
    map.insert(
        "layer2.0.conv1.weight".into(),
        Tensor::zeros((2 * WIDTH, WIDTH, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&map, "shape");
    let err = ImageNetResNet18::load(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer2.0.conv1.weight"), "{err}");
    assert!(err.contains("shape"), "{err}");
    std::fs::remove_file(path).ok();
}

#[test]
fn unexpected_key_is_rejected_but_fc_and_prefix_are_handled() {
    let (mut map, _) = tiny_imagenet_tensors();
    map.insert(
        "layer5.0.conv1.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&map, "unexpected");
    let err = ImageNetResNet18::load(&path, None, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer5.0.conv1.weight"), "{err}");
    std::fs::remove_file(&path).ok();

    // Under a prefix, keys outside it are none of the network's business.
    map.remove("layer5.0.conv1.weight");
    let mut prefixed: HashMap<String, Tensor> = map
        .into_iter()
        .map(|(k, v)| (format!("backbone.{k}"), v))
        .collect();
    prefixed.insert(
        "neck.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&prefixed, "prefixed");
    let net = AttentionNet::imagenet_from_file(&path, Some("backbone."), &Device::Cpu).unwrap();
    assert!(matches!(net, AttentionNet::ImageNet(_)));
    assert!(AttentionNet::imagenet_from_file(&path, None, &Device::Cpu).is_err());
    std::fs::remove_file(path).ok();
}

#[test]
fn attention_features_follow_section_5_7() {
    let (map, _) = tiny_imagenet_tensors();
    let path = save(&map, "features");
    let net = ImageNetResNet18::load(&path, None, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).ok();
    let att = AttentionNet::ImageNet(net.clone());
    let x = inputs(2, 32);
    let feats = att.attention_features(&x).unwrap();
    assert_eq!(feats.dims(), &[2, 8 * WIDTH, 7, 7]);
    // Same as: bilinear ×7 (align_corners = false) then a train-mode forward.
    let xs = x.upsample_bilinear2d(224, 224, false).unwrap();
    let want = net.forward_t(&xs, true).unwrap();
    let diff = (feats - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn attention_forward_updates_running_statistics() {
    let (map, _) = tiny_imagenet_tensors();
    let path = save(&map, "bnstats");
    let att = AttentionNet::imagenet_from_file(&path, None, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).ok();
    let AttentionNet::ImageNet(net) = &att else {
        unreachable!()
    };
    let x = inputs(2, 32);
    let eval_before = net.forward_t(&inputs(1, 64), false).unwrap();
    att.attention_features(&x).unwrap();
    let eval_after = net.forward_t(&inputs(1, 64), false).unwrap();
    let diff = (eval_before - eval_after)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        diff.to_scalar::<f32>().unwrap() > 0.0,
        "train-mode BN must update running stats"
    );
}

#[test]
fn cifar_checkpoint_as_attention_network() {
    let cfg = CifarResNetConfig {
        arch: Arch::ResNet18,
        base_width: 4,
        stage_blocks: Some([1, 1, 1, 1]),
        ..Default::default()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = CifarResNet::new(cfg, vb.pp("model")).unwrap();
    net.init_weights(&varmap, 1).unwrap();
    let path = temp_path("cifar");
    varmap.save(&path).unwrap();

    let att = AttentionNet::cifar_from_file(&path, cfg, Some("model."), &Device::Cpu).unwrap();
    let x = inputs(2, 32);
    let feats = att.attention_features(&x).unwrap();
    assert_eq!(feats.dims(), &[2, 32, 7, 7]);
    let want = net
        .features(&x.upsample_bilinear2d(56, 56, false).unwrap(), true)
        .unwrap();
    let diff = (feats - want).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);

    // The wrong architecture is refused with a key name.
    let wrong = CifarResNetConfig {
        arch: Arch::ResNeXt50,
        ..cfg
    };
    let err = AttentionNet::cifar_from_file(&path, wrong, Some("model."), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layer1.0."), "{err}");
    std::fs::remove_file(path).ok();
}

#[test]
fn load_recognizes_what_the_file_holds() {
    // torchvision file, bare and under an mmcls-style prefix.
    let (map, _) = tiny_imagenet_tensors();
    let path = save(&map, "auto-imagenet");
    let net = AttentionNet::load(&path, &Device::Cpu).unwrap();
    assert!(matches!(&net, AttentionNet::ImageNet(n) if n.base_width() == WIDTH));
    std::fs::remove_file(&path).ok();
    let prefixed: HashMap<String, Tensor> = map
        .into_iter()
        .map(|(k, v)| (format!("backbone.{k}"), v))
        .collect();
    let path = save(&prefixed, "auto-mmcls");
    assert!(matches!(
        AttentionNet::load(&path, &Device::Cpu).unwrap(),
        AttentionNet::ImageNet(_)
    ));
    std::fs::remove_file(&path).ok();

    // A CIFAR ResNeXt checkpoint with non-default depth; two networks in one file.
    let cfg = CifarResNetConfig {
        arch: Arch::ResNeXt50,
        base_width: 4,
        stage_blocks: Some([1, 2, 1, 1]),
        num_classes: 7,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let q = CifarResNet::new(cfg, vb.pp("model_q")).unwrap();
    q.init_weights(&varmap, 4).unwrap();
    let path = temp_path("auto-cifar");
    varmap.save(&path).unwrap();
    match AttentionNet::load(&path, &Device::Cpu).unwrap() {
        AttentionNet::Cifar { net, input_size } => {
            assert_eq!(input_size, 56);
            assert_eq!(net.config().arch, Arch::ResNeXt50);
            assert_eq!(net.config().blocks(), [1, 2, 1, 1]);
            assert_eq!(net.num_classes(), 7);
            assert_eq!(net.config().base_width, 4);
        }
        other => panic!("expected a CIFAR network, got {other:?}"),
    }
    CifarResNet::new(cfg, vb.pp("model_k")).unwrap();
    varmap.save(&path).unwrap();
    let err = AttentionNet::load(&path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("load_with_prefix"), "{err}");
    let k = AttentionNet::load_with_prefix(&path, Some("model_k."), &Device::Cpu).unwrap();
    assert!(matches!(k, AttentionNet::Cifar { .. }));
    std::fs::remove_file(&path).ok();
}
