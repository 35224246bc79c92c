//! Load + augment throughput of the training loader on a real CIFAR-10 directory.
//!
//! `cargo run -p cifar-data --release --example bench_loader -- DIR [BATCH] [BATCHES]`

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .ok_or("usage: bench_loader DIR [BATCH] [BATCHES]")?,
    );
    let batch: usize = args.next().map_or(Ok(100), |s| s.parse())?;
    let batches: usize = args.next().map_or(Ok(500), |s| s.parse())?;
    let train = cifar_data::load_train(&dir)?;
    for workers in [0, 1, 2, 4] {
        let rate = cifar_data::bench_load_augment(&train, batch, workers, batches);
        println!("workers {workers}: {rate:.0} images/s");
    }
    Ok(())
}
