//! Workspace tasks for the CIFAR-10 mixup benchmark: config and launch-script
//! generation (`gen-configs`) and result tables/plots (`report`).
//! Depends on `bench-config` and `plotters` (SVG backend only), never on candle, so it
//! builds in seconds.

pub mod gen;
pub mod methods;
pub mod plot;
pub mod report;
