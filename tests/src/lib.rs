//! Integration tests: real guests under KVM.
