//! Augmentation, ordering, determinism and normalization.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use cifar_data::{
    augment_image, batch_augment_params, denormalize_to_u8, epoch_permutation, test_batches,
    to_device_batch, AugmentParams, CifarSplit, LoaderConfig, PaddingMode, TrainLoader, U8Batch,
    MEAN, STD,
};

/// An image whose R plane holds `row + 1`, G plane `col + 1` and B plane 200, so every output
/// pixel of an augmentation reveals which source pixel (or padding) it came from.
fn coded_image() -> Vec<u8> {
    let mut img = vec![0u8; 3072];
    for y in 0..32 {
        for x in 0..32 {
            img[y * 32 + x] = y as u8 + 1;
            img[1024 + y * 32 + x] = x as u8 + 1;
            img[2048 + y * 32 + x] = 200;
        }
    }
    img
}

/// Recovers `(top, left, flip)` from an augmented coded image, checking on the way that every
/// pixel is either the expected source pixel or zero padding exactly where padding belongs.
fn decode_params(out: &[u8]) -> AugmentParams {
    // a crop row y shows source row y + top − 4; the centre row is always inside the image
    let top = out[16 * 32 + 16] as usize - 1 + 4 - 16;
    let g_centre = out[1024 + 16 * 32 + 16] as i64;
    let g_next = out[1024 + 16 * 32 + 17] as i64;
    let flip = g_next < g_centre;
    let left = if flip {
        // x' = 31 − x; source col = 31 − 16 + left − 4
        (g_centre - 1 - 15 + 4) as usize
    } else {
        (g_centre - 1 - 16 + 4) as usize
    };
    let p = AugmentParams { top, left, flip };
    for y in 0..32 {
        for x in 0..32 {
            let sy = y as i64 + top as i64 - 4;
            let xc = if flip { 31 - x } else { x };
            let sx = xc as i64 + left as i64 - 4;
            let inside = (0..32).contains(&sy) && (0..32).contains(&sx);
            let got = [
                out[y * 32 + x],
                out[1024 + y * 32 + x],
                out[2048 + y * 32 + x],
            ];
            let want = if inside {
                [sy as u8 + 1, sx as u8 + 1, 200]
            } else {
                [0, 0, 0]
            };
            assert_eq!(got, want, "pixel ({y},{x}) for {p:?}");
        }
    }
    p
}

fn coded_split(n: usize) -> Arc<CifarSplit> {
    let img = coded_image();
    Arc::new(CifarSplit {
        images: img.repeat(n),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
    })
}

fn cfg(batch_size: usize, workers: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        workers,
        prefetch: 4,
        padding_mode: PaddingMode::Constant,
        seed,
        drop_last: false,
    }
}

fn collect(split: &Arc<CifarSplit>, c: LoaderConfig, epoch: usize, start: usize) -> Vec<U8Batch> {
    TrainLoader::new(split.clone(), c, epoch, start)
        .unwrap()
        .collect()
}

#[test]
fn crop_offsets_flip_rate_and_zero_padding() {
    let n = 2000;
    let split = coded_split(n);
    let mut top_counts = [0usize; 9];
    let mut left_counts = [0usize; 9];
    let mut flips = 0usize;
    let loader = TrainLoader::new(split.clone(), cfg(100, 2, 11), 3, 0).unwrap();
    assert_eq!(loader.batches_per_epoch(), 20);
    for (b, batch) in loader.enumerate() {
        let expected = batch_augment_params(11, 3, b, batch.len);
        for (i, want) in expected.iter().enumerate() {
            let p = decode_params(batch.image(i));
            assert_eq!(p, *want, "batch {b} image {i}");
            top_counts[p.top] += 1;
            left_counts[p.left] += 1;
            flips += p.flip as usize;
        }
    }
    // U{0..8}: each value expected 2000/9 ≈ 222 times, sd ≈ 14; allow ±5 sd
    for counts in [top_counts, left_counts] {
        for (v, &c) in counts.iter().enumerate() {
            assert!(
                (152..=292).contains(&c),
                "offset {v} seen {c} times: {counts:?}"
            );
        }
    }
    // Bernoulli(0.5): mean 1000, sd ≈ 22.4; allow ±5 sd
    assert!((888..=1112).contains(&flips), "{flips} flips out of {n}");
}

/// The parameter streams alone, over 100,000 draws, to bound the distributions tightly.
#[test]
fn augment_parameter_distribution() {
    let mut top_counts = [0usize; 9];
    let mut left_counts = [0usize; 9];
    let mut flips = 0usize;
    let mut joint = std::collections::HashSet::new();
    for b in 0..200 {
        for p in batch_augment_params(0, 1, b, 500) {
            top_counts[p.top] += 1;
            left_counts[p.left] += 1;
            flips += p.flip as usize;
            joint.insert((p.top, p.left, p.flip));
        }
    }
    // expected 11,111 each, sd ≈ 99; allow ±5 sd
    for counts in [top_counts, left_counts] {
        for (v, &c) in counts.iter().enumerate() {
            assert!(
                (10_614..=11_608).contains(&c),
                "offset {v}: {c}, {counts:?}"
            );
        }
    }
    // expected 50,000, sd ≈ 158; allow ±5 sd
    assert!((49_210..=50_790).contains(&flips), "{flips} flips");
    assert_eq!(
        joint.len(),
        9 * 9 * 2,
        "every (top, left, flip) combination occurs"
    );
    // different batches get different draws
    assert_ne!(
        batch_augment_params(0, 1, 0, 50),
        batch_augment_params(0, 1, 1, 50)
    );
}

#[test]
fn augment_image_identity_and_explicit_cases() {
    let img: Vec<u8> = (0..3072).map(|i| (i % 253) as u8 + 1).collect();
    let mut out = vec![0u8; 3072];
    augment_image(
        &img,
        &mut out,
        AugmentParams::IDENTITY,
        PaddingMode::Constant,
    );
    assert_eq!(out, img);
    // top 0, left 8, flipped: rows 0..4 are padding; in each row, the flipped output columns
    // 0..4 come from padded cols 39..36 = padding, the rest from source col 35 − x
    let p = AugmentParams {
        top: 0,
        left: 8,
        flip: true,
    };
    augment_image(&img, &mut out, p, PaddingMode::Constant);
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                let got = out[c * 1024 + y * 32 + x];
                let want = if y < 4 || x < 4 {
                    0
                } else {
                    img[c * 1024 + (y - 4) * 32 + (35 - x)]
                };
                assert_eq!(got, want, "c{c} y{y} x{x}");
            }
        }
    }
}

#[test]
fn reflect_padding_mirrors_without_repeating_the_edge() {
    let img = coded_image();
    let mut out = vec![0u8; 3072];
    let p = AugmentParams {
        top: 0,
        left: 0,
        flip: false,
    };
    augment_image(&img, &mut out, p, PaddingMode::Reflect);
    assert!(!out.contains(&0), "reflect padding must not produce zeros");
    // padded row r ↦ source |r − 4| for r < 4: rows 0..4 show source rows 4, 3, 2, 1
    for (y, src) in [(0, 4), (1, 3), (2, 2), (3, 1), (4, 0), (5, 1)] {
        assert_eq!(out[y * 32 + 10], src + 1, "row {y}");
    }
    let p = AugmentParams {
        top: 8,
        left: 8,
        flip: false,
    };
    augment_image(&img, &mut out, p, PaddingMode::Reflect);
    // padded row 35 + k (k ≥ 1) ↦ source 31 − k: output rows 28..32 show 30, 29, 28, 27
    for (y, src) in [(27, 31), (28, 30), (29, 29), (30, 28), (31, 27)] {
        assert_eq!(out[y * 32 + 10], src + 1, "row {y}");
        assert_eq!(out[1024 + 10 * 32 + y], src + 1, "col {y}");
    }
}

#[test]
fn padding_mode_serde_names() {
    assert_eq!(
        serde_json::to_string(&PaddingMode::Constant).unwrap(),
        "\"constant\""
    );
    assert_eq!(
        serde_json::from_str::<PaddingMode>("\"reflect\"").unwrap(),
        PaddingMode::Reflect
    );
}

/// Images whose every pixel equals their index (n ≤ 255), so the centre pixel, always inside
/// the crop, identifies the image after augmentation.
fn indexed_split(n: usize) -> Arc<CifarSplit> {
    assert!(n <= 255);
    Arc::new(CifarSplit {
        images: (0..n)
            .flat_map(|i| std::iter::repeat_n(i as u8 + 1, 3072))
            .collect(),
        labels: (0..n).map(|i| (i * 7 % 10) as u8).collect(),
    })
}

#[test]
fn epoch_visits_every_image_once_in_the_loader_order() {
    let split = indexed_split(205);
    let loader = TrainLoader::new(split.clone(), cfg(20, 3, 5), 0, 0).unwrap();
    assert_eq!(loader.batches_per_epoch(), 11);
    let order = loader.order().to_vec();
    assert_eq!(order, epoch_permutation(205, 5, 0));
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    for batch in loader {
        sizes.push(batch.len);
        for i in 0..batch.len {
            let idx = batch.image(i)[16 * 32 + 16] as usize - 1;
            assert_eq!(batch.labels[i], split.labels[idx] as u32);
            seen.push(idx);
        }
    }
    assert_eq!(seen, order);
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..205).collect::<Vec<_>>());
    assert_eq!(sizes, [vec![20; 10], vec![5]].concat());
    assert_ne!(order, (0..205).collect::<Vec<_>>(), "the order is shuffled");

    let dropped = TrainLoader::new(
        split,
        LoaderConfig {
            drop_last: true,
            ..cfg(20, 0, 5)
        },
        0,
        0,
    )
    .unwrap();
    assert_eq!(dropped.batches_per_epoch(), 10);
    assert_eq!(dropped.count(), 10);
}

#[test]
fn batches_are_reproducible_across_workers_and_resume() {
    let split = indexed_split(230);
    let reference = collect(&split, cfg(16, 0, 42), 2, 0);
    assert_eq!(reference.len(), 15);
    for workers in [1, 2, 3, 8] {
        for prefetch in [1, 4] {
            let c = LoaderConfig {
                prefetch,
                ..cfg(16, workers, 42)
            };
            assert!(
                collect(&split, c, 2, 0) == reference,
                "workers {workers} prefetch {prefetch} changed the batches"
            );
        }
    }
    for start in [1, 7, 14, 15] {
        let resumed = collect(&split, cfg(16, 2, 42), 2, start);
        assert!(resumed == reference[start..], "resume at batch {start}");
    }
    assert!(
        collect(&split, cfg(16, 2, 42), 3, 0) != reference,
        "epochs differ"
    );
    assert!(
        collect(&split, cfg(16, 2, 43), 2, 0) != reference,
        "seeds differ"
    );
    assert!(TrainLoader::new(split.clone(), cfg(16, 2, 42), 2, 16).is_err());
    assert!(TrainLoader::new(split, cfg(0, 2, 42), 2, 0).is_err());
}

#[test]
fn dropping_a_loader_mid_epoch_stops_its_threads() {
    let split = indexed_split(250);
    for _ in 0..5 {
        let mut loader = TrainLoader::new(
            split.clone(),
            LoaderConfig {
                prefetch: 1,
                ..cfg(2, 4, 1)
            },
            0,
            0,
        )
        .unwrap();
        assert!(loader.next().is_some());
        drop(loader); // would hang here if blocked workers were not released
    }
}

#[test]
fn test_batches_are_sequential_and_unaugmented() {
    let (images, labels) = common::synthetic(23, 9);
    let split = CifarSplit {
        images: images.clone(),
        labels: labels.clone(),
    };
    let batches: Vec<U8Batch> = test_batches(&split, 10).collect();
    assert_eq!(
        batches.iter().map(|b| b.len).collect::<Vec<_>>(),
        [10, 10, 3]
    );
    let pixels: Vec<u8> = batches.iter().flat_map(|b| b.pixels.clone()).collect();
    let all_labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(pixels, images);
    assert_eq!(
        all_labels,
        labels.iter().map(|&l| l as u32).collect::<Vec<_>>()
    );
}

#[test]
fn device_normalization_matches_the_formula_and_inverts() {
    // 256 images per channel value would be wasteful: one image holds every value in each
    // channel (value = pixel index mod 256), plus a second, constant image
    let mut pixels: Vec<u8> = (0..3072).map(|i| (i % 256) as u8).collect();
    pixels.extend(std::iter::repeat_n(17u8, 3072));
    let batch = U8Batch {
        pixels: pixels.clone(),
        labels: vec![4, 9],
        len: 2,
    };
    let (x, y) = to_device_batch(&batch, &Device::Cpu).unwrap();
    assert_eq!(x.dims(), &[2, 3, 32, 32]);
    assert_eq!(x.dtype(), DType::F32);
    assert_eq!(y.dtype(), DType::U32);
    assert_eq!(y.to_vec1::<u32>().unwrap(), vec![4, 9]);
    let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, (&v, &got)) in pixels.iter().zip(&values).enumerate() {
        let c = (k / 1024) % 3;
        let want = (v as f64 / 255.0 - MEAN[c] as f64) / STD[c] as f64;
        assert!(
            (got as f64 - want).abs() < 1e-6,
            "value {v} channel {c}: {got} vs {want}"
        );
    }
    assert_eq!(denormalize_to_u8(&x).unwrap(), pixels);
    // a single CHW image works too, and out-of-range values saturate
    let one = x.get(0).unwrap();
    assert_eq!(denormalize_to_u8(&one).unwrap(), pixels[..3072]);
    let extreme = Tensor::full(100f32, (1, 3, 2, 2), &Device::Cpu).unwrap();
    assert_eq!(denormalize_to_u8(&extreme).unwrap(), vec![255; 12]);
    let low = Tensor::full(-100f32, (3, 1, 1), &Device::Cpu).unwrap();
    assert_eq!(denormalize_to_u8(&low).unwrap(), vec![0; 3]);
    assert!(
        denormalize_to_u8(&Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap()).is_err()
    );
}

#[test]
fn bench_reports_a_positive_rate() {
    let split = indexed_split(120);
    let rate = cifar_data::bench_load_augment(&split, 25, 2, 7);
    assert!(rate.is_finite() && rate > 0.0, "{rate}");
}
