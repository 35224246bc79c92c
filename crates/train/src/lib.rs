//! Training machinery (being built).
