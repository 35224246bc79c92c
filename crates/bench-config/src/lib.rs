//! The run configuration: plain JSON, no inheritance, every field defaulted.
//!
//! Field names follow OpenMixup's configs (`mix_mode`, `alpha`, `mix_prob`,
//! `mix_repeat`, `mix_args`, `optimizer`, `lr_config`, `max_epochs`, …) so a
//! researcher can read one beside the other. Unknown fields are rejected, so a
//! typo is an error instead of a silently ignored setting. Defaults are the
//! CIFAR-10 benchmark's ResNet-18 MixUp recipe (spec §1–§4).
//!
//! This crate only describes and parses; semantic checks that need the methods
//! themselves (known mode names, α > 0, …) live in [`RunConfig::validate`] and
//! in the runner.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Every `model.mix_mode` the runner knows: the hand-crafted methods of `mix-ops` and the
/// learned ones of `automix` (the runner checks that both agree with this list).
pub const MIX_MODES: [&str; 13] = [
    "vanilla",
    "mixup",
    "cutmix",
    "manifoldmix",
    "smoothmix",
    "saliencymix",
    "attentivemix",
    "fmix",
    "puzzlemix",
    "gridmix",
    "resizemix",
    "automix",
    "samix",
];

/// `model.mix_mode` in the schema: a known mode or a list of 1 to 5 of them.
fn mix_mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [
            {"type": "string", "enum": MIX_MODES},
            {"type": "array", "items": {"type": "string", "enum": MIX_MODES}, "minItems": 1, "maxItems": 5}
        ]
    })
}

/// `model.alpha` in the schema: omitted/null, a number > 0, or a list of 1 to 5 of them.
fn alpha_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "anyOf": [
            {"type": "null"},
            {"type": "number", "exclusiveMinimum": 0},
            {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0}, "minItems": 1, "maxItems": 5}
        ]
    })
}

/// A value that may be given as one item or as a list (`"mixup"` or `["mixup", "cutmix"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// A list of values.
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// The whole run configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Experiment name; default: the config file's stem (set by the loader).
    #[schemars(regex(pattern = r"^[^/\\]*$"), extend("not" = {"enum": [".", ".."]}))]
    pub name: String,
    /// Network and mixing settings.
    pub model: ModelConfig,
    /// Data location and loader settings.
    pub data: DataConfig,
    /// SGD settings (spec §3.1).
    pub optimizer: OptimizerConfig,
    /// Learning-rate schedule (spec §3.2).
    pub lr_config: LrConfig,
    /// Number of training epochs (default 400, the base configs' value).
    #[schemars(range(min = 1))]
    pub max_epochs: usize,
    /// Seed of every random stream of the run (default 0, as `dist_train.sh`).
    pub seed: u64,
    /// Output directory for logs and checkpoints; default `work_dirs/<name>`.
    pub work_dir: Option<String>,
    /// Checkpoint cadence (spec §8.2).
    pub checkpoint: CheckpointConfig,
    /// Logging cadence (spec §8.3).
    pub log: LogConfig,
    /// Evaluation settings (spec §3.3).
    pub evaluation: EvalConfig,
    /// Numerics of the training step on CUDA (precision, determinism). Omitted when default.
    #[serde(skip_serializing_if = "TrainConfig::is_default")]
    pub train: TrainConfig,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            model: ModelConfig::default(),
            data: DataConfig::default(),
            optimizer: OptimizerConfig::default(),
            lr_config: LrConfig::default(),
            max_epochs: 400,
            seed: 0,
            work_dir: None,
            checkpoint: CheckpointConfig::default(),
            log: LogConfig::default(),
            evaluation: EvalConfig::default(),
            train: TrainConfig::default(),
        }
    }
}

/// Backbone architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// CIFAR ResNet-18 (11,173,962 parameters with the 10-way head).
    Resnet18,
    /// CIFAR ResNeXt-50 32x4d (22,992,714 parameters with the 10-way head).
    Resnext50,
}

/// Weight initialisation scheme (spec §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InitScheme {
    /// Benchmark-era: Kaiming-normal fan-out convs, zero-init residual BN, N(0, 0.01²) FC.
    Benchmark,
    /// PyTorch module defaults (HEAD OpenMixup since v0.2.7).
    PytorchDefault,
}

/// Backbone settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BackboneConfig {
    /// `resnet18` (default) or `resnext50`.
    pub arch: Arch,
    /// Channels of the stem and first stage (64 in the benchmark; smaller for tests).
    #[schemars(range(min = 1))]
    pub base_width: usize,
    /// Blocks per stage; `None` = the architecture's own (`[2,2,2,2]` / `[3,4,6,3]`).
    #[schemars(inner(range(min = 1)))]
    pub stage_blocks: Option<[usize; 4]>,
    /// Initialisation scheme (default `benchmark`).
    pub init: InitScheme,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            arch: Arch::Resnet18,
            base_width: 64,
            stage_blocks: None,
            init: InitScheme::Benchmark,
        }
    }
}

/// Classification loss of the head (spec §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum HeadLoss {
    /// `λ·CE(z, y_a) + (1−λ)·CE(z, y_b)` (every table row but PuzzleMix).
    #[serde(rename = "CE_none")]
    CeNone,
    /// Soft-target cross-entropy (PuzzleMix).
    #[serde(rename = "CE_soft")]
    CeSoft,
    /// Binary cross-entropy with logits on the soft target, summed over classes.
    #[serde(rename = "CE_sigm")]
    CeSigm,
}

/// Head settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    /// Loss (default `CE_none`).
    pub loss: HeadLoss,
    /// Number of classes (default 10).
    #[schemars(range(min = 2))]
    pub num_classes: usize,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self {
            loss: HeadLoss::CeNone,
            num_classes: 10,
        }
    }
}

/// Network and mixing settings (OpenMixup's `model` dict).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Mixing mode or list of modes (default `"mixup"`).
    #[schemars(schema_with = "mix_mode_schema")]
    pub mix_mode: OneOrMany<String>,
    /// α per mode, same length as `mix_mode`; omitted (default) = each mode's benchmark α
    /// for the configured backbone (the README table: MixUp 1, CutMix 0.2, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "alpha_schema")]
    pub alpha: Option<OneOrMany<f64>>,
    /// Probability of each mode; `None` (default) = uniform.
    #[schemars(inner(range(min = 0.0, max = 1.0)), length(min = 1, max = 5))]
    pub mix_prob: Option<Vec<f64>>,
    /// Mixing repeats per batch, at least 1 (default 1).
    #[schemars(range(min = 1))]
    pub mix_repeat: usize,
    /// Per-mode overrides of the methods' hyper-parameters, keyed by mode name
    /// (e.g. `{"manifoldmix": {"layer": [0, 3]}}`); omitted fields keep the
    /// CIFAR-10 benchmark values.
    #[schemars(extend("propertyNames" = {"enum": MIX_MODES}, "additionalProperties" = {"type": "object"}))]
    pub mix_args: BTreeMap<String, serde_json::Value>,
    /// Backbone.
    pub backbone: BackboneConfig,
    /// Head and loss.
    pub head: HeadConfig,
    /// AttentiveMix+: safetensors file of the frozen attention network.
    pub attention_weights: Option<String>,
    /// AutoMix/SAMix settings (the fields of `automix::AutoMixConfig`, e.g.
    /// `{"mask_adjust": 0.25}`); `None` (default) = the adapted CIFAR config of the
    /// chosen mode. Only allowed with `mix_mode` `automix` or `samix`.
    #[schemars(extend("type" = ["object", "null"]))]
    pub automix: Option<serde_json::Value>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            mix_mode: OneOrMany::One("mixup".into()),
            alpha: None,
            mix_prob: None,
            mix_repeat: 1,
            mix_args: BTreeMap::new(),
            backbone: BackboneConfig::default(),
            head: HeadConfig::default(),
            attention_weights: None,
            automix: None,
        }
    }
}

/// Zero-padding (benchmark) or reflection padding for the random crop (spec §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PaddingMode {
    /// Pad with zeros (the CIFAR-10 config).
    Constant,
    /// Reflect-pad (the CIFAR-100 configs).
    Reflect,
}

/// Data settings (spec §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory with `data_batch_{1..5}.bin` + `test_batch.bin`, or a
    /// `cifar-10-batches-py` pickle directory (default `data/cifar10`).
    pub dir: String,
    /// Download the official archive into `dir` when the files are missing (default false).
    pub download: bool,
    /// Images per training batch (default 100).
    #[schemars(range(min = 1))]
    pub batch_size: usize,
    /// Images per evaluation batch (default 100).
    #[schemars(range(min = 1))]
    pub test_batch_size: usize,
    /// Background threads producing augmented batches (default 2).
    pub workers: usize,
    /// Batches kept ready ahead of the model (default 4).
    pub prefetch: usize,
    /// Crop padding mode (default `constant`).
    pub padding_mode: PaddingMode,
    /// Use only the first N training images (smoke runs); `None` = all.
    #[schemars(range(min = 1))]
    pub limit_train: Option<usize>,
    /// Use only the first N test images (smoke runs); `None` = all.
    #[schemars(range(min = 1))]
    pub limit_test: Option<usize>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: "data/cifar10".into(),
            download: false,
            batch_size: 100,
            test_batch_size: 100,
            workers: 2,
            prefetch: 4,
            padding_mode: PaddingMode::Constant,
            limit_train: None,
            limit_test: None,
        }
    }
}

/// SGD settings (spec §3.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// Base learning rate (default 0.1).
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub lr: f64,
    /// Momentum (default 0.9).
    #[schemars(range(min = 0.0))]
    pub momentum: f64,
    /// Weight decay applied to every parameter (default 1e-4).
    #[schemars(range(min = 0.0))]
    pub weight_decay: f64,
    /// Nesterov momentum (default false).
    pub nesterov: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            nesterov: false,
        }
    }
}

/// Per-epoch cosine annealing (spec §3.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LrConfig {
    /// Final learning rate (default 0; AutoMix/SAMix use 0.05).
    #[schemars(range(min = 0.0))]
    pub min_lr: f64,
}

impl Default for LrConfig {
    fn default() -> Self {
        Self { min_lr: 0.0 }
    }
}

/// Checkpoint cadence (spec §8.2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every N epochs, and always after the last one (default 10).
    #[schemars(range(min = 1))]
    pub interval: usize,
    /// Keep this many newest epoch checkpoints (default 1).
    #[schemars(range(min = 1))]
    pub max_keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: 10,
            max_keep: 1,
        }
    }
}

/// Logging cadence (spec §8.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Write a train line every N iterations (default 50).
    #[schemars(range(min = 1))]
    pub interval: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { interval: 50 }
    }
}

/// Evaluation settings (spec §3.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate every N epochs (default 1).
    #[schemars(range(min = 1))]
    pub interval: usize,
    /// The reported metric is the median top-1 over the last `median_window + 1`
    /// evaluations, epochs `E−window..E` (default 10, i.e. 11 values, as the upstream summarizer).
    pub median_window: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            interval: 1,
            median_window: 10,
        }
    }
}

/// Arithmetic of convolutions and matmuls on CUDA (`train.precision`). The CPU always
/// computes in f32, whatever this says.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Strict f32 (cuDNN FMA math, no TF32).
    F32,
    /// f32 storage, TF32 tensor-core math for convolutions and matmuls (the default, as
    /// PyTorch's default for cuDNN convolutions).
    #[default]
    Tf32,
    /// bf16 autocast of convolutions (f32 accumulation, f32 master weights, gradients and
    /// BatchNorm statistics).
    Bf16,
}

/// Numerics of the training step (`train` section).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `"f32"`, `"tf32"` (default) or `"bf16"`. On the CPU f32 and tf32 both compute in f32 and
    /// bf16 is refused.
    pub precision: Precision,
    /// Restrict cuDNN to deterministic algorithms (default false). CPU runs are always
    /// deterministic.
    pub deterministic: bool,
}

impl TrainConfig {
    /// Whether every field has its default (then the section is not serialized).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A configuration error, with the offending file or field named.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl RunConfig {
    /// The JSON Schema of the config (for editors' completion and checking),
    /// with each field's documentation as its description.
    pub fn json_schema() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(RunConfig)).expect("a schema serializes")
    }

    /// Parses a config from JSON text; `origin` names the source in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let cfg = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let inner = e.inner();
            if inner.is_syntax() || inner.is_eof() {
                // The path of a syntax error is meaningless (`model.?`): say where instead.
                return ConfigError(format!("{origin}: invalid JSON: {inner}"));
            }
            let path = e.path().to_string();
            let what = explain(&path, &inner.to_string());
            if path.is_empty() || path == "." {
                ConfigError(format!("{origin}: {what}"))
            } else {
                ConfigError(format!("{origin}: {path}: {what}"))
            }
        })?;
        // `{…} xyz` must not pass as `{…}`: only whitespace may follow the object.
        de.end().map_err(|e| {
            ConfigError(format!(
                "{origin}: unexpected content after the config object ({e})"
            ))
        })?;
        Ok(cfg)
    }

    /// Parses a config from JSON text after applying `--set path=value`
    /// overrides (`value` is JSON, or a plain string when it does not parse as
    /// JSON), so an override is checked exactly like the file's own fields.
    pub fn from_json_with_overrides(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        if overrides.is_empty() {
            return Self::from_json(text, origin);
        }
        // Syntax and trailing-content errors are reported against the file as is.
        Self::from_json(text, origin)?;
        let mut doc: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ConfigError(format!("{origin}: invalid JSON: {e}")))?;
        apply_overrides(&mut doc, overrides)?;
        Self::from_json(&doc.to_string(), &format!("{origin} (with --set)"))
    }

    /// Reads and parses a config file, filling `name` from the file stem when empty.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_overrides(path, &[])
    }

    /// [`RunConfig::load`] with `--set FIELD=VALUE` overrides applied before parsing.
    pub fn load_with_overrides(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read config: {e}", path.display())))?;
        let mut cfg =
            Self::from_json_with_overrides(&text, &path.display().to_string(), overrides)?;
        if cfg.name.is_empty() {
            cfg.name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
        }
        Ok(cfg)
    }

    /// Pretty JSON with a trailing newline (the generator's on-disk form).
    pub fn to_json_pretty(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("config serializes");
        s.push('\n');
        s
    }

    /// The work directory: `work_dir` or `work_dirs/<name>`.
    pub fn work_dir(&self) -> String {
        self.work_dir
            .clone()
            .unwrap_or_else(|| format!("work_dirs/{}", self.name))
    }

    /// Structural checks that need no knowledge of the methods: list lengths,
    /// positive α, probabilities, positive sizes. Errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        let modes = self.model.mix_mode.to_vec();
        if modes.is_empty() {
            return err("model.mix_mode: at least one mode is required".into());
        }
        if modes.len() >= 6 {
            return err(format!(
                "model.mix_mode: at most 5 modes are allowed, got {}",
                modes.len()
            ));
        }
        if self.name.contains(['/', '\\']) || self.name == "." || self.name == ".." {
            return err(format!(
                "name: `{}` must be a plain name (no path separators or `..`): it names the work dir under work_dirs/",
                self.name
            ));
        }
        if let Some(alpha) = &self.model.alpha {
            let alphas = alpha.to_vec();
            if alphas.len() != modes.len() {
                return err(format!(
                    "model.alpha: {} value(s) given for {} mode(s) in model.mix_mode (or omit it for each mode's default)",
                    alphas.len(),
                    modes.len()
                ));
            }
            for (m, a) in modes.iter().zip(&alphas) {
                if !(a.is_finite() && *a > 0.0) && m != "vanilla" {
                    return err(format!("model.alpha: α for `{m}` must be > 0, got {a}"));
                }
            }
        }
        if self.model.mix_repeat == 0 {
            return err("model.mix_repeat: must be at least 1".into());
        }
        if let Some(p) = &self.model.mix_prob {
            if p.len() != modes.len() {
                return err(format!(
                    "model.mix_prob: {} value(s) given for {} mode(s)",
                    p.len(),
                    modes.len()
                ));
            }
            if p.iter().any(|v| !v.is_finite() || *v < 0.0) {
                return err("model.mix_prob: probabilities must be finite and ≥ 0".into());
            }
            let sum: f64 = p.iter().sum();
            if (sum - 1.0).abs() > 1e-6 {
                return err(format!("model.mix_prob: must sum to 1, sums to {sum}"));
            }
        }
        for key in self.model.mix_args.keys() {
            if !modes.contains(key) {
                return err(format!(
                    "model.mix_args: `{key}` is not one of the configured modes {modes:?}"
                ));
            }
        }
        if self.model.automix.is_some() && !modes.iter().any(|m| m == "automix" || m == "samix") {
            return err("model.automix: only used with mix_mode `automix` or `samix`".into());
        }
        if self.model.head.num_classes < 2 {
            return err("model.head.num_classes: must be at least 2".into());
        }
        if self.model.backbone.base_width == 0 {
            return err("model.backbone.base_width: must be positive".into());
        }
        if let Some(blocks) = self.model.backbone.stage_blocks {
            if blocks.contains(&0) {
                return err(format!(
                    "model.backbone.stage_blocks: every stage needs at least one block, got {blocks:?}"
                ));
            }
        }
        if self.data.batch_size == 0 {
            return err("data.batch_size: must be positive".into());
        }
        if self.data.test_batch_size == 0 {
            return err("data.test_batch_size: must be positive".into());
        }
        if self.data.limit_train == Some(0) {
            return err("data.limit_train: must be positive (omit it to use every image)".into());
        }
        if self.data.limit_test == Some(0) {
            return err("data.limit_test: must be positive (omit it to use every image)".into());
        }
        if self.max_epochs == 0 {
            return err("max_epochs: must be positive".into());
        }
        if !(self.optimizer.lr.is_finite() && self.optimizer.lr > 0.0) {
            return err(format!(
                "optimizer.lr: must be finite and > 0, got {}",
                self.optimizer.lr
            ));
        }
        // The optimizer's own rules (train::sgd), checked here so that --check-config and
        // the start of a run report them against the field.
        if !(self.optimizer.momentum.is_finite() && self.optimizer.momentum >= 0.0) {
            return err(format!(
                "optimizer.momentum: must be finite and ≥ 0, got {}",
                self.optimizer.momentum
            ));
        }
        if !(self.optimizer.weight_decay.is_finite() && self.optimizer.weight_decay >= 0.0) {
            return err(format!(
                "optimizer.weight_decay: must be finite and ≥ 0, got {}",
                self.optimizer.weight_decay
            ));
        }
        if self.optimizer.nesterov && self.optimizer.momentum == 0.0 {
            return err(
                "optimizer.nesterov: Nesterov momentum needs optimizer.momentum > 0".into(),
            );
        }
        if self.lr_config.min_lr < 0.0 || self.lr_config.min_lr > self.optimizer.lr {
            return err(format!(
                "lr_config.min_lr: must lie in [0, optimizer.lr], got {}",
                self.lr_config.min_lr
            ));
        }
        if self.checkpoint.interval == 0 {
            return err("checkpoint.interval: must be positive".into());
        }
        if self.checkpoint.max_keep == 0 {
            return err("checkpoint.max_keep: must be positive".into());
        }
        if self.log.interval == 0 {
            return err("log.interval: must be positive".into());
        }
        if self.evaluation.interval == 0 {
            return err("evaluation.interval: must be positive".into());
        }
        Ok(())
    }
}

/// Applies `--set FIELD=VALUE` overrides to a config document, in order; returns the dotted
/// paths set. `VALUE` is JSON, or a plain string when it is not JSON — except text that reads
/// as a number but is not a JSON number (`1e400` overflows, `.5` is not JSON): that is an
/// error, never silently a string.
pub fn apply_overrides(
    doc: &mut serde_json::Value,
    overrides: &[String],
) -> Result<Vec<String>, ConfigError> {
    let mut paths = Vec::with_capacity(overrides.len());
    for o in overrides {
        let (path, raw) = o.split_once('=').ok_or_else(|| {
            ConfigError(format!(
                "--set {o}: expected FIELD=VALUE, e.g. model.backbone.base_width=16"
            ))
        })?;
        let value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) if looks_numeric(raw) => {
                let why = match raw.trim().parse::<f64>() {
                    Ok(x) if !x.is_finite() => "the number is out of range".to_string(),
                    _ => format!("not a JSON number ({e})"),
                };
                return Err(ConfigError(format!("--set {o}: {why}")));
            }
            Err(_) => serde_json::Value::String(raw.to_string()),
        };
        set_path(doc, path, value).map_err(|e| ConfigError(format!("--set {o}: {e}")))?;
        paths.push(path.to_string());
    }
    Ok(paths)
}

/// Text a user means as a number: an optional sign, then a digit or a point and a digit.
fn looks_numeric(raw: &str) -> bool {
    let t = raw.trim();
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    let mut chars = t.chars();
    match chars.next() {
        Some(c) if c.is_ascii_digit() => true,
        Some('.') => chars.next().is_some_and(|c| c.is_ascii_digit()),
        _ => false,
    }
}

/// Sets the dotted `path` of a JSON object, creating intermediate objects.
fn set_path(
    doc: &mut serde_json::Value,
    path: &str,
    value: serde_json::Value,
) -> Result<(), String> {
    let mut node = doc;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("`{path}` is not a dotted field path"));
    }
    for (i, key) in keys.iter().enumerate() {
        let obj = match node {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => {
                *node = serde_json::Value::Object(Default::default());
                node.as_object_mut().expect("just made")
            }
            _ => return Err(format!("`{}` is not an object", keys[..i].join("."))),
        };
        if i + 1 == keys.len() {
            obj.insert(key.to_string(), value);
            return Ok(());
        }
        node = obj
            .entry(key.to_string())
            .or_insert(serde_json::Value::Null);
    }
    unreachable!("the loop returns at the last key")
}

/// A friendlier serde message: what a one-or-many field expects, and the
/// nearest known name for an unknown field.
fn explain(path: &str, msg: &str) -> String {
    if msg.contains("untagged enum OneOrMany") {
        let what = if path.ends_with("alpha") {
            "a number or a list of numbers (e.g. 1.0 or [1.0, 0.2])"
        } else {
            "a string or a list of strings (e.g. \"mixup\" or [\"mixup\", \"cutmix\"])"
        };
        let at = msg.find(" at line").map_or("", |i| &msg[i..]);
        return format!("expected {what}{at}");
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        if let Some((name, tail)) = rest.split_once('`') {
            let known: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            let best = known
                .iter()
                .map(|k| (strsim::jaro_winkler(name, k), *k))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, k)) = best {
                return format!("{msg} (did you mean `{k}`?)");
            }
        }
    }
    msg.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_gives_the_benchmark_defaults() {
        let c = RunConfig::from_json("{}", "t").unwrap();
        assert_eq!(c, RunConfig::default());
        assert_eq!(c.optimizer.lr, 0.1);
        assert_eq!(c.data.batch_size, 100);
        c.validate().unwrap();
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let e =
            RunConfig::from_json(r#"{"model": {"mix_mod": "cutmix"}}"#, "cfg.json").unwrap_err();
        assert!(e.0.contains("cfg.json") && e.0.contains("mix_mod"), "{e}");
    }

    #[test]
    fn string_or_list_modes() {
        let c = RunConfig::from_json(
            r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": [1, 0.2], "mix_prob": [0.5, 0.5]}}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.model.mix_mode.to_vec(), vec!["mixup", "cutmix"]);
        c.validate().unwrap();
    }

    #[test]
    fn structural_errors_name_the_field() {
        let cases = [
            (
                r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": 1}}"#,
                "model.alpha",
            ),
            (r#"{"model": {"alpha": 0}}"#, "model.alpha"),
            (r#"{"model": {"alpha": -1}}"#, "model.alpha"),
            (
                r#"{"model": {"mix_mode": ["mixup", "cutmix"], "alpha": [1, 1], "mix_prob": [0.5, 0.6]}}"#,
                "model.mix_prob",
            ),
            (
                r#"{"model": {"mix_args": {"cutmix": {}}}}"#,
                "model.mix_args",
            ),
            (r#"{"max_epochs": 0}"#, "max_epochs"),
            (r#"{"model": {"mix_repeat": 0}}"#, "model.mix_repeat"),
            (
                r#"{"data": {"test_batch_size": 0}}"#,
                "data.test_batch_size",
            ),
            (r#"{"data": {"limit_train": 0}}"#, "data.limit_train"),
            (r#"{"data": {"limit_test": 0}}"#, "data.limit_test"),
            (
                r#"{"model": {"backbone": {"stage_blocks": [0, 0, 0, 0]}}}"#,
                "model.backbone.stage_blocks",
            ),
            (r#"{"name": "../escape"}"#, "name"),
            (r#"{"checkpoint": {"max_keep": 0}}"#, "checkpoint.max_keep"),
            (r#"{"optimizer": {"momentum": -0.9}}"#, "optimizer.momentum"),
            (
                r#"{"optimizer": {"weight_decay": -1e-4}}"#,
                "optimizer.weight_decay",
            ),
            (
                r#"{"optimizer": {"momentum": 0, "nesterov": true}}"#,
                "optimizer.nesterov",
            ),
        ];
        for (json, field) in cases {
            let e = RunConfig::from_json(json, "t")
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.0.starts_with(field), "{json}: {e}");
        }
    }

    #[test]
    fn trailing_content_after_the_object_is_an_error() {
        let e = RunConfig::from_json("{} xyz", "cfg.json").unwrap_err();
        assert!(e.0.starts_with("cfg.json: unexpected content"), "{e}");
        RunConfig::from_json("{}\n  \n", "cfg.json").unwrap();
    }

    #[test]
    fn errors_say_what_was_expected_and_suggest_names() {
        let e = RunConfig::from_json(r#"{"model": {"alpha": "1.0"}}"#, "c.json").unwrap_err();
        assert!(
            e.0.starts_with("c.json: model.alpha: expected a number or a list"),
            "{e}"
        );
        let e = RunConfig::from_json(r#"{"model": {"alpha": 1.0,}}"#, "c.json").unwrap_err();
        assert!(
            e.0.starts_with("c.json: invalid JSON: trailing comma at line 1"),
            "{e}"
        );
        let e = RunConfig::from_json(r#"{"model": {"mix_mod": "x"}}"#, "c.json").unwrap_err();
        assert!(e.0.ends_with("(did you mean `mix_mode`?)"), "{e}");
    }

    #[test]
    fn set_overrides_any_field_before_validation() {
        let sets = [
            "model.backbone.base_width=16".to_string(),
            "model.mix_mode=cutmix".to_string(),
            "optimizer.lr=0.05".to_string(),
        ];
        let c = RunConfig::from_json_with_overrides("{}", "c.json", &sets).unwrap();
        assert_eq!(c.model.backbone.base_width, 16);
        assert_eq!(c.model.mix_mode.to_vec(), vec!["cutmix"]);
        assert_eq!(c.optimizer.lr, 0.05);
        let e =
            RunConfig::from_json_with_overrides("{}", "c.json", &["model.backbone.widht=3".into()])
                .unwrap_err();
        assert!(
            e.0.contains("c.json (with --set): model.backbone.widht"),
            "{e}"
        );
        let e = RunConfig::from_json_with_overrides("{}", "c.json", &["seed".into()]).unwrap_err();
        assert!(e.0.starts_with("--set seed: expected FIELD=VALUE"), "{e}");
        let e = RunConfig::from_json_with_overrides("{}", "c.json", &["optimizer.lr=1e400".into()])
            .unwrap_err();
        assert_eq!(e.0, "--set optimizer.lr=1e400: the number is out of range");
        let e = RunConfig::from_json_with_overrides("{}", "c.json", &["optimizer.lr=.5".into()])
            .unwrap_err();
        assert!(
            e.0.starts_with("--set optimizer.lr=.5: not a JSON number"),
            "{e}"
        );
        // Plain words stay strings.
        let c =
            RunConfig::from_json_with_overrides("{}", "c.json", &["name=run-2".into()]).unwrap();
        assert_eq!(c.name, "run-2");
    }

    #[test]
    fn a_multi_mode_config_may_omit_alpha() {
        let c =
            RunConfig::from_json(r#"{"model": {"mix_mode": ["mixup", "cutmix"]}}"#, "t").unwrap();
        assert_eq!(c.model.alpha, None);
        c.validate().unwrap();
    }

    #[test]
    fn round_trips_through_json() {
        let c = RunConfig::default();
        let back = RunConfig::from_json(&c.to_json_pretty(), "t").unwrap();
        assert_eq!(c, back);
    }
}
