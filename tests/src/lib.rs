//! Holds nothing: the end-to-end tests live in `tests/`.
