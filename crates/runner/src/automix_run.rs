//! Training AutoMix / SAMix (`mix_mode: "automix" | "samix"`): the same
//! loader, schedule, logs and checkpoints as the other modes, around the
//! `automix` crate's model (two encoders, MixBlock, momentum updates).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use automix::{AutoMixConfig, AutoMixModel};
use bench_config::RunConfig;
use candle_core::{DType, Device, Tensor};
use cifar_data::CifarSplit;
use serde_json::{json, Value};
use train::checkpoint;
use train::log::TrainLine;
use train::metrics;
use train::schedule::cosine_lr;
use train::sgd::Sgd;

use crate::setup;
use crate::trainer::{
    checkpoint_meta, epoch_loader, peak_memory_mb, progress_bar, restore_or_start, resume_point,
    write_atomic, RunState, WorkDir,
};
use crate::TrainArgs;

/// The AutoMix/SAMix settings of a run config: the mode's adapted CIFAR
/// defaults, α from `model.alpha`, then the overrides of `model.automix`.
pub fn automix_config(cfg: &RunConfig) -> Result<AutoMixConfig> {
    let mode = cfg.model.mix_mode.to_vec()[0].clone();
    let mut base = match mode.as_str() {
        "samix" => serde_json::to_value(AutoMixConfig::samix())?,
        _ => serde_json::to_value(AutoMixConfig::automix())?,
    };
    base["alpha"] = json!(cfg.model.alpha.to_vec()[0]);
    if let Some(Value::Object(over)) = &cfg.model.automix {
        for (k, v) in over {
            if k == "variant" {
                anyhow::bail!("model.automix.variant: the variant is chosen by model.mix_mode");
            }
            base[k] = v.clone();
        }
    } else if cfg.model.automix.is_some() {
        anyhow::bail!("model.automix: must be an object");
    }
    let am: AutoMixConfig =
        serde_json::from_value(base).map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    am.validate()
        .map_err(|e| anyhow::anyhow!("model.automix: {e}"))?;
    Ok(am)
}

/// Builds the model of a config (freshly initialised from `seed`).
pub fn build_model(cfg: &RunConfig, device: &Device) -> Result<AutoMixModel> {
    Ok(AutoMixModel::new(
        automix_config(cfg)?,
        setup::backbone_config(cfg),
        device,
        cfg.seed,
    )?)
}

/// SGD over the model's groups, with the config's momentum and weight decay for the encoder.
pub fn optimizer(model: &AutoMixModel, cfg: &RunConfig) -> Result<Sgd> {
    let mut sgd: Option<Sgd> = None;
    for group in model.optimizer_groups() {
        let (name, vars, mut opts) = (group.name, group.vars, group.options);
        if name == "q" {
            opts = crate::trainer::sgd_options(cfg);
        } else {
            opts.momentum = cfg.optimizer.momentum;
            opts.nesterov = cfg.optimizer.nesterov;
        }
        match &mut sgd {
            None => sgd = Some(Sgd::new(vars, opts)?),
            Some(s) => s.add_group(vars, opts)?,
        }
    }
    sgd.context("the AutoMix model has no optimizer group")
}

/// Entry point for `automix` / `samix` configs.
pub fn run(args: &TrainArgs, cfg: RunConfig, device: Device) -> Result<()> {
    if cfg.lr_config.min_lr != automix::MIN_LR {
        eprintln!(
            "note: lr_config.min_lr is {} (the AutoMix/SAMix recipe uses {})",
            cfg.lr_config.min_lr,
            automix::MIN_LR
        );
    }
    let work_dir = WorkDir(PathBuf::from(cfg.work_dir()));
    let resume = resume_point(args, &work_dir)?;
    std::fs::create_dir_all(&work_dir.0)
        .with_context(|| format!("work_dir {}: cannot create", work_dir.0.display()))?;
    let (train_data, test_data) = setup::load_data(&cfg)?;
    let model = build_model(&cfg, &device)?;
    let mut sgd = optimizer(&model, &cfg)?;
    let state: RunState<BTreeMap<String, Vec<(usize, f64)>>> =
        restore_or_start(&cfg, &device, &work_dir, resume, &model.varmaps(), &mut sgd)?;
    let (start_epoch, mut rng, mut history, mut logger) = (
        state.start_epoch,
        state.mix_rng,
        state.history,
        state.logger,
    );

    let max_epochs = cfg.max_epochs;
    let last_epoch = match args.stop_after {
        Some(n) => (start_epoch + n).min(max_epochs),
        None => max_epochs,
    };
    let iters_per_epoch = train_data.len().div_ceil(cfg.data.batch_size);
    let total_iters = iters_per_epoch * max_epochs;
    for epoch in start_epoch..last_epoch {
        let lr = cosine_lr(epoch, max_epochs, cfg.optimizer.lr, cfg.lr_config.min_lr);
        let loader = epoch_loader(&cfg, &train_data, epoch)?;
        let bar = progress_bar(iters_per_epoch, epoch, max_epochs, args.quiet);
        let mut sums: Vec<(&'static str, Tensor)> = Vec::new();
        let (mut images, mut iters, mut data_wait) = (0usize, 0usize, 0.0);
        let mut t_last = Instant::now();
        let mut t_fetch = Instant::now();
        for (it, batch) in loader.enumerate() {
            data_wait += t_fetch.elapsed().as_secs_f64();
            let (x, y) = cifar_data::to_device_batch(&batch, &device)?;
            let global = epoch * iters_per_epoch + it;
            let out = model.train_step(&x, &y, &mut rng)?;
            let grads = out.loss.backward()?;
            sgd.step(&grads, lr)?;
            model.momentum_update(model.momentum_at(global, total_iters))?;
            // Logged values stay on the device until a line is written.
            let w = batch.len as f64;
            let mut values = vec![("loss", out.loss.detach())];
            values.extend(out.logs.iter().cloned());
            for (i, (k, v)) in values.into_iter().enumerate() {
                let v = (v.to_dtype(DType::F32)? * w)?;
                if sums.len() <= i {
                    sums.push((k, v));
                } else {
                    sums[i].1 = (&sums[i].1 + v)?;
                }
            }
            images += batch.len;
            iters += 1;
            bar.inc(1);
            let done = it + 1;
            if done % cfg.log.interval == 0 || done == iters_per_epoch {
                let elapsed = t_last.elapsed().as_secs_f64();
                let mut metrics_line = Vec::new();
                for (k, v) in sums.drain(..) {
                    metrics_line
                        .push((k.to_string(), v.to_scalar::<f32>()? as f64 / images as f64));
                }
                bar.set_message(format!(
                    "loss {:.4} lr {lr:.4} {:.0} img/s",
                    metrics_line[0].1,
                    images as f64 / elapsed.max(1e-9)
                ));
                logger.write_train(&TrainLine {
                    epoch: epoch + 1,
                    iter: done,
                    lr,
                    memory_mb: peak_memory_mb(),
                    data_time: data_wait / iters as f64,
                    metrics: metrics_line,
                    time: elapsed / iters as f64,
                })?;
                (images, iters, data_wait) = (0, 0, 0.0);
                t_last = Instant::now();
            }
            t_fetch = Instant::now();
        }
        bar.finish_and_clear();
        let done = epoch + 1;
        if done % cfg.evaluation.interval == 0 || done == max_epochs {
            let accs = evaluate(&model, &test_data, cfg.data.test_batch_size, &device)?;
            let mut fields = Vec::new();
            for (head, top1, top5) in &accs {
                history
                    .entry(head.to_string())
                    .or_default()
                    .push((done, *top1));
                fields.push((format!("{head}_top1"), *top1));
                fields.push((format!("{head}_top5"), *top5));
            }
            let batches = test_data.len().div_ceil(cfg.data.test_batch_size);
            logger.write_val(done, batches, lr, &fields)?;
            let shown: Vec<String> = accs
                .iter()
                .map(|(h, t1, _)| format!("{h} {t1:.2}"))
                .collect();
            eprintln!("epoch {done}/{max_epochs}: top-1 {}", shown.join(", "));
        }
        if done % cfg.checkpoint.interval == 0 || done == max_epochs || done == last_epoch {
            let mut tensors = Vec::new();
            for (prefix, vm) in model.varmaps() {
                tensors.extend(checkpoint::varmap_tensors(vm, prefix));
            }
            tensors.extend(checkpoint::with_prefix(&sgd.state_tensors()?, "optim."));
            let meta = checkpoint_meta(&cfg, done, iters_per_epoch, &rng, &history, &logger)?;
            checkpoint::save_epoch_checkpoint(
                &work_dir.0,
                done,
                &tensors,
                &meta,
                Some(cfg.checkpoint.max_keep),
            )?;
        }
    }
    if last_epoch == max_epochs {
        let window = cfg.evaluation.median_window;
        let medians: Vec<(&str, f64)> = history
            .iter()
            .filter_map(|(h, v)| {
                metrics::median_last_k(v, max_epochs, window).map(|m| (h.as_str(), m))
            })
            .collect();
        let best = automix::best_head(&medians);
        let summary = json!({
            "mode": "summary",
            "max_epochs": max_epochs,
            "median_top1": best.map(|b| b.1),
            "best_head": best.map(|b| b.0),
            "head_medians": medians.iter().map(|(h, m)| (h.to_string(), json!(m))).collect::<serde_json::Map<_, _>>(),
            "median_window_epochs": [max_epochs.saturating_sub(window), max_epochs],
        });
        logger.write_fields(&[
            ("mode", summary["mode"].clone()),
            ("max_epochs", summary["max_epochs"].clone()),
            ("median_top1", summary["median_top1"].clone()),
            ("best_head", summary["best_head"].clone()),
            ("head_medians", summary["head_medians"].clone()),
        ])?;
        write_atomic(
            &work_dir.0.join("result.json"),
            &serde_json::to_string_pretty(&summary)?,
        )?;
        println!("{}", serde_json::to_string(&summary)?);
    }
    Ok(())
}

/// Top-1 / top-5 (%) of each of the four predictors (§5.12.7).
fn evaluate(
    model: &AutoMixModel,
    data: &Arc<CifarSplit>,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<(&'static str, f64, f64)>> {
    let mut counts: Vec<(&'static str, usize, usize)> = Vec::new();
    for b in cifar_data::test_batches(data, batch_size) {
        let (x, y) = cifar_data::to_device_batch(&b, device)?;
        for (i, (head, logits)) in model.eval_logits(&x)?.into_iter().enumerate() {
            let c = metrics::topk_corrects(&logits, &y, &[1, 5.min(logits.dim(1)?)])?;
            if counts.len() <= i {
                counts.push((head, 0, 0));
            }
            counts[i].1 += c[0];
            counts[i].2 += c[1];
        }
    }
    let n = data.len().max(1) as f64;
    Ok(counts
        .into_iter()
        .map(|(h, c1, c5)| (h, 100.0 * c1 as f64 / n, 100.0 * c5 as f64 / n))
        .collect())
}
