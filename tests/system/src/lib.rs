//! Shared harness for whole-system tests.
