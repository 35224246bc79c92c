//! AutoMix / SAMix (being built).
