//! CIFAR-10 loading and augmentation (being built).
