//! Statistics as pure functions over numbers, each with its own tests: `rank` (fixed-horizon
//! Mann-Whitney U and Hodges-Lehmann, Kayenta-compatible) and `eprocess` (anytime-valid tests by
//! betting, safe to read after every batch). `verdict` combines them per experiment.

pub mod eprocess;
pub mod rank;
pub mod sim;
