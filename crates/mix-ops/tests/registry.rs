//! The registry builds every mode, accepts the CIFAR-10 config's mix_args,
//! and rejects unknown names and bad arguments with clear messages.

mod common;

use mix_ops::fmix::FMixArgs;
use mix_ops::gridmix::GridMixArgs;
use mix_ops::manifoldmix::ManifoldMixArgs;
use mix_ops::registry::{build_method, default_alpha, parse_args, MIX_MODES};
use mix_ops::resizemix::ResizeMixArgs;
use mix_ops::MixContext;
use serde_json::json;

#[test]
fn every_mode_builds_with_default_args_and_mixes() {
    let (x, y) = common::batch(0, 4);
    for &mode in MIX_MODES {
        let method = build_method(mode, 1.0, None).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(method.name(), mode);
        // These two need a model (MixModel) to mix; their own tests cover that.
        if mode == "puzzlemix" || mode == "attentivemix" {
            continue;
        }
        let mixed = method
            .mix(&x, &y, &mut MixContext::new(&mut common::rng(1)))
            .unwrap();
        assert_eq!(mixed.images.dims(), x.dims());
    }
}

#[test]
fn cifar10_config_mix_args_parse_to_the_defaults() {
    let fmix: FMixArgs = parse_args(
        "fmix",
        Some(&json!({"decay_power": 3, "size": [32, 32], "max_soft": 0.0, "reformulate": false})),
    )
    .unwrap();
    assert_eq!(fmix, FMixArgs::default());
    let grid: GridMixArgs = parse_args(
        "gridmix",
        Some(&json!({"n_holes": [2, 6], "hole_aspect_ratio": 1.0,
                     "cut_area_ratio": [0.5, 1], "cut_aspect_ratio": [0.5, 2]})),
    )
    .unwrap();
    assert_eq!(grid, GridMixArgs::default());
    let resize: ResizeMixArgs = parse_args(
        "resizemix",
        Some(&json!({"scope": [0.1, 0.8], "use_alpha": true})),
    )
    .unwrap();
    assert_eq!(resize, ResizeMixArgs::default());
    let manifold: ManifoldMixArgs =
        parse_args("manifoldmix", Some(&json!({"layer": [0, 3]}))).unwrap();
    assert_eq!(manifold, ManifoldMixArgs::default());
    // Null and empty objects mean "defaults".
    assert_eq!(
        parse_args::<FMixArgs>("fmix", Some(&json!(null))).unwrap(),
        FMixArgs::default()
    );
    assert_eq!(
        parse_args::<FMixArgs>("fmix", Some(&json!({}))).unwrap(),
        FMixArgs::default()
    );
}

fn error_of(mode: &str, alpha: f64, args: serde_json::Value) -> String {
    match build_method(mode, alpha, Some(&args)) {
        Ok(_) => panic!("{mode} {args} should be rejected"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_modes_and_bad_args_are_clear_errors() {
    let msg = error_of("foo", 1.0, json!(null));
    assert!(
        msg.contains("unknown mix_mode `foo`") && msg.contains("cutmix"),
        "{msg}"
    );
    let msg = error_of("automix", 2.0, json!(null));
    assert!(msg.contains("automix crate"), "{msg}");

    let msg = error_of("cutmix", 0.2, json!({"bogus": 1}));
    assert!(msg.contains("`cutmix`") && msg.contains("bogus"), "{msg}");
    let msg = error_of("mixup", 1.0, json!({"layer": [0, 3]}));
    assert!(msg.contains("`mixup`") && msg.contains("layer"), "{msg}");
    let msg = error_of("manifoldmix", 2.0, json!({"layer": [0, 5]}));
    assert!(
        msg.contains("`manifoldmix`") && msg.contains("`layer`"),
        "{msg}"
    );
    let msg = error_of("manifoldmix", 2.0, json!({"layer": [2, 2]}));
    assert!(msg.contains("`layer`"), "{msg}");
    let msg = error_of("manifoldmix", 2.0, json!({"layer": [-1, 3]}));
    assert!(msg.contains("`manifoldmix`"), "{msg}");
    assert!(build_method("manifoldmix", 2.0, Some(&json!({"layer": [0, 4]}))).is_ok());
    let msg = error_of("resizemix", 1.0, json!({"scope": [0.5, 1.2]}));
    assert!(msg.contains("`scope`"), "{msg}");
    let msg = error_of("gridmix", 0.2, json!({"n_holes": [6, 2]}));
    assert!(msg.contains("`n_holes`"), "{msg}");
    let msg = error_of("fmix", 0.2, json!({"size": "big"}));
    assert!(
        msg.contains("`fmix`") && msg.contains("invalid type"),
        "{msg}"
    );
    let msg = error_of("saliencymix", 0.2, json!({"std": [0.2, 0.0, 0.2]}));
    assert!(msg.contains("`std`"), "{msg}");
    let msg = error_of("cutmix", 0.0, json!(null));
    assert!(msg.contains("alpha"), "{msg}");
    let msg = error_of("smoothmix", f64::NAN, json!(null));
    assert!(msg.contains("alpha"), "{msg}");
    // α is irrelevant for vanilla, but its mix_args must still be empty.
    assert!(build_method("vanilla", 0.0, None).is_ok());
    assert!(error_of("vanilla", 1.0, json!({"x": 1})).contains("`vanilla`"));
}

#[test]
fn alpha_table_matches_the_readme() {
    assert_eq!(default_alpha("mixup", "r18"), Some(1.0));
    assert_eq!(default_alpha("cutmix", "rx50"), Some(0.2));
    assert_eq!(default_alpha("manifoldmix", "r18"), Some(2.0));
    assert_eq!(default_alpha("smoothmix", "r18"), Some(0.5));
    assert_eq!(default_alpha("smoothmix", "rx50"), Some(0.2));
    assert_eq!(default_alpha("attentivemix", "rx50"), Some(2.0));
    assert_eq!(default_alpha("puzzlemix", "r18"), Some(1.0));
    assert_eq!(default_alpha("resizemix", "rx50"), Some(1.0));
    assert_eq!(default_alpha("automix", "r18"), Some(2.0));
    assert_eq!(default_alpha("vanilla", "r18"), None);
    assert_eq!(default_alpha("mixup", "vit"), None);
    for &mode in MIX_MODES.iter().filter(|&&m| m != "vanilla") {
        assert!(default_alpha(mode, "r18").is_some() && default_alpha(mode, "rx50").is_some());
    }
}
