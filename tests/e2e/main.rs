//! End-to-end tests: they run the real `cairn` binary, as users and scripts do.

mod support;

mod controls;
mod crash;
mod durable;
mod examples;
mod graph;
mod invalid_plans;
mod regressions;
