pub mod fake_backend;
