//! CIFAR ResNet backbones (being built).
